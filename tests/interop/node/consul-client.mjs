// The npm `consul` client, unchanged, against meshpilot's Consul-compatible API: register with a
// TTL check, heartbeat, discover, watch with blocking queries, KV, deregister. Prints one JSON line
// of observations for tests/interop/test_consul_node.py to judge.
import Consul from "consul";

const port = Number(process.argv[2]);
const consul = new Consul({ host: "127.0.0.1", port });
const out = {};

await consul.agent.service.register({ name: "node-web", id: "node-web-1", port: 7070, tags: ["node"], meta: { version: "2" }, check: { ttl: "10s" } });
out.beforePass = (await consul.health.service({ service: "node-web", passing: true })).length;

const changes = [];
const watch = consul.watch({ method: consul.health.service, options: { service: "node-web", passing: true, wait: "5s" } });
const firstTwo = new Promise((resolve, reject) => {
  watch.on("change", (data) => { changes.push(data.length); if (changes.length === 2) resolve(); });
  watch.on("error", reject);
});
await new Promise((r) => setTimeout(r, 300));
await consul.agent.check.pass({ id: "service:node-web-1", note: "ok" });
await Promise.race([firstTwo, new Promise((_, reject) => setTimeout(() => reject(new Error("watch saw no change within 10s")), 10000))]);
watch.end();
out.watchChanges = changes;

const passing = await consul.health.service({ service: "node-web", passing: true });
out.afterPass = passing.map((e) => ({ id: e.Service.ID, port: e.Service.Port, version: e.Service.Meta.version, tags: e.Service.Tags }));
out.catalog = await consul.catalog.service.list();
await consul.kv.set("node/key", "value");
out.kv = (await consul.kv.get("node/key")).Value;
await consul.kv.del("node/key");
out.kvAfterDelete = (await consul.kv.get("node/key")) ?? null;
await consul.agent.service.deregister("node-web-1");
out.afterDeregister = (await consul.health.service("node-web")).length;
console.log(JSON.stringify(out));
