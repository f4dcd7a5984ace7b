//! `check-config`: reads a filter configuration on stdin and prints `ok` or the parser's error,
//! exiting 0 or 1. The same parser as the filter's `proxy_on_configure`, built natively, so the
//! control plane's encoder can be checked against it without starting Envoy.

use std::io::Read;

fn main() {
    let mut input = Vec::new();
    if let Err(e) = std::io::stdin().read_to_end(&mut input) {
        eprintln!("check-config: cannot read stdin: {}", e);
        std::process::exit(2);
    }
    match mesh::config::parse(&input) {
        Ok(c) => println!("ok breakers={} ratelimits={} tick_ms={}", c.breakers.len(), c.limits.len(), c.tick_ms),
        Err(e) => {
            println!("{}", e);
            std::process::exit(1);
        }
    }
}
