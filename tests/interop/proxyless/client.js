// A proxyless @grpc/grpc-js-xds client for the interop tests: calls xds:///<target> in a loop and
// prints one line per call, "<unix time> <server name or error code>", until stdin closes or the
// time limit passes. GRPC_XDS_BOOTSTRAP must point at the control plane's bootstrap file.
'use strict';

const path = require('path');
const modules = process.env.NODE_XDS_MODULES;
const grpc = require(path.join(modules, '@grpc/grpc-js'));
const xds = require(path.join(modules, '@grpc/grpc-js-xds'));
const protoLoader = require(path.join(modules, '@grpc/proto-loader'));

const [protoFile, target, limitSeconds] = process.argv.slice(2);
xds.register();
const definition = protoLoader.loadSync(protoFile, { keepCase: true });
const Echo = grpc.loadPackageDefinition(definition).meshpilot.test.echo.Echo;
const client = new Echo(`xds:///${target}`, grpc.credentials.createInsecure());

let stopped = false;
process.stdin.on('data', () => {});
process.stdin.on('end', () => { stopped = true; });
const deadline = Date.now() + Number(limitSeconds) * 1000;

function once() {
  return new Promise((resolve) => {
    client.Call({ message: 'hi' }, { deadline: Date.now() + 5000, waitForReady: true }, (err, reply) => {
      resolve(err ? `error:${grpc.status[err.code] || err.code}` : reply.server);
    });
  });
}

// grpc-js unreferences its own handles: while a call waits for a new picker (right after a route
// change) nothing else may keep the event loop alive, and node would exit with the call pending.
const keepAlive = setInterval(() => {}, 1000);

async function loop() {
  while (!stopped && Date.now() < deadline) {
    const outcome = await once();
    process.stdout.write(`${(Date.now() / 1000).toFixed(3)} ${outcome}\n`);
    if (outcome.startsWith('error:')) await new Promise((r) => setTimeout(r, 10));
  }
}

// a few calls in flight at once, as an application would have
Promise.all([loop(), loop(), loop(), loop()]).then(() => {
  clearInterval(keepAlive);
  client.close();
  process.exit(0);
});
