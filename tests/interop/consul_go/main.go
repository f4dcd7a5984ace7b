// HashiCorp's Go client (github.com/hashicorp/consul/api) against meshpilot's Consul-compatible API.
//
// Usage: consulgo <host:port> <scenario>. Each scenario drives the client the way Go programs use it
// and prints one JSON object with what it saw; tests/interop/test_consul_go.py judges it. A client
// error exits 1 with the error on stderr.
package main

import (
	"encoding/json"
	"fmt"
	"os"
	"sort"
	"sync"
	"time"

	"github.com/hashicorp/consul/api"
)

type result map[string]any

func must[T any](v T, err error) T {
	if err != nil {
		fail(err)
	}
	return v
}

func check(err error) {
	if err != nil {
		fail(err)
	}
}

func fail(err error) {
	fmt.Fprintln(os.Stderr, err)
	os.Exit(1)
}

// waitHash: a watch loop on one service with the client's WaitHash, as consul-template and
// Connect proxies run it; it must block while the service is unchanged and wake when it changes.
func waitHash(c *api.Client) result {
	reg := &api.AgentServiceRegistration{ID: "hashed-1", Name: "hashed", Port: 7001, Address: "127.0.0.1"}
	check(c.Agent().ServiceRegister(reg))
	_, meta := must2(c.Agent().Service("hashed-1", nil))
	first := meta.LastContentHash
	var mu sync.Mutex
	requests := 0
	seen := []string{}
	stop := time.Now().Add(3 * time.Second)
	go func() {
		time.Sleep(1500 * time.Millisecond)
		reg.Tags = []string{"changed"}
		check(c.Agent().ServiceRegister(reg))
	}()
	hash := first
	for time.Now().Before(stop) {
		svc, m := must2(c.Agent().Service("hashed-1", &api.QueryOptions{WaitHash: hash, WaitTime: time.Until(stop) + 10*time.Millisecond}))
		mu.Lock()
		requests++
		if m.LastContentHash != hash {
			seen = append(seen, fmt.Sprint(svc.Tags))
		}
		mu.Unlock()
		hash = m.LastContentHash
	}
	return result{"first_hash": first, "requests": requests, "changes": seen}
}

func must2[A any, B any](a A, b B, err error) (A, B) {
	if err != nil {
		fail(err)
	}
	return a, b
}

// fields: Meta and TaggedAddresses come back exactly as registered, from every view.
func fields(c *api.Client) result {
	meta := map[string]string{"version": "1.2", "team": "payments"}
	check(c.Agent().ServiceRegister(&api.AgentServiceRegistration{
		ID: "fields-1", Name: "fields", Port: 7002, Address: "127.0.0.1", Meta: meta, Tags: []string{"grpc"},
		TaggedAddresses: map[string]api.ServiceAddress{"wan": {Address: "198.51.100.7", Port: 8443}},
	}))
	agentSvc, _ := must2(c.Agent().Service("fields-1", nil))
	health, _ := must2(c.Health().Service("fields", "", false, nil))
	catalog, _ := must2(c.Catalog().Service("fields", "", nil))
	return result{
		"agent_meta": agentSvc.Meta, "agent_tagged": agentSvc.TaggedAddresses,
		"health_meta": health[0].Service.Meta, "health_tagged": health[0].Service.TaggedAddresses,
		"catalog_meta": catalog[0].ServiceMeta, "catalog_tagged": catalog[0].ServiceTaggedAddresses,
	}
}

// names: names Consul accepts (underscore, dot, mixed case) and Port 0 register and read back as given.
func names(c *api.Client) result {
	out := result{}
	regs := []api.AgentServiceRegistration{
		{ID: "under_score-1", Name: "under_score", Port: 7003},
		{ID: "dotted-1", Name: "api.v2", Port: 7004},
		{ID: "Mixed-1", Name: "MixedCase", Port: 7005},
		{ID: "portless-1", Name: "portless", Port: 0},
	}
	for i := range regs {
		r := regs[i]
		if err := c.Agent().ServiceRegister(&r); err != nil {
			out[r.Name] = result{"error": err.Error()}
			continue
		}
		entries, _ := must2(c.Health().Service(r.Name, "", false, nil))
		got := []result{}
		for _, e := range entries {
			got = append(got, result{"service": e.Service.Service, "id": e.Service.ID, "port": e.Service.Port})
		}
		out[r.Name] = result{"entries": got}
	}
	services, _ := must2(c.Catalog().Services(nil))
	listed := []string{}
	for name := range services {
		listed = append(listed, name)
	}
	sort.Strings(listed)
	out["catalog"] = listed
	agentSvcs := must(c.Agent().Services())
	ids := []string{}
	for id, s := range agentSvcs {
		ids = append(ids, id+"="+s.Service)
	}
	sort.Strings(ids)
	out["agent"] = ids
	return out
}

// ttlNote: heartbeats with a new note each time must not wake a passing-only health watch.
func ttlNote(c *api.Client) result {
	check(c.Agent().ServiceRegister(&api.AgentServiceRegistration{
		ID: "beat-1", Name: "beat", Port: 7006, Address: "127.0.0.1", Check: &api.AgentServiceCheck{CheckID: "beat-ttl", TTL: "30s"},
	}))
	check(c.Agent().PassTTL("beat-ttl", "alive 0"))
	_, meta := must2(c.Health().Service("beat", "", true, nil))
	done := make(chan struct{})
	go func() {
		defer close(done)
		for n := 1; n <= 20; n++ {
			check(c.Agent().PassTTL("beat-ttl", fmt.Sprintf("alive %d", n)))
			time.Sleep(100 * time.Millisecond)
		}
	}()
	start := time.Now()
	wakes := 0
	index := meta.LastIndex
	deadline := start.Add(2500 * time.Millisecond)
	for time.Now().Before(deadline) {
		_, m := must2(c.Health().Service("beat", "", true, &api.QueryOptions{WaitIndex: index, WaitTime: time.Until(deadline)}))
		if m.LastIndex != index {
			wakes++
			index = m.LastIndex
		}
	}
	<-done
	checks := must(c.Agent().Checks())
	return result{"wakes": wakes, "agent_output": checks["beat-ttl"].Output, "status": checks["beat-ttl"].Status}
}

// lock: api.LockKey over sessions and KV acquire/release, contended by a second lock.
func lock(c *api.Client) result {
	out := result{}
	first := must(c.LockKey("locks/leader"))
	leaderCh, err := first.Lock(nil)
	check(err)
	out["first_locked"] = leaderCh != nil
	pair, _ := must2(c.KV().Get("locks/leader", nil))
	out["holder_session_set"] = pair != nil && pair.Session != ""
	if pair != nil {
		info, _ := must2(c.Session().Info(pair.Session, nil))
		out["session_info"] = info != nil && info.ID == pair.Session && info.TTL == "15s"
	}
	second := must(c.LockOpts(&api.LockOptions{Key: "locks/leader", LockTryOnce: true, LockWaitTime: time.Second}))
	ch2, err := second.Lock(nil)
	check(err)
	out["second_locked_while_held"] = ch2 != nil
	check(first.Unlock())
	ch3, err := second.Lock(nil)
	check(err)
	out["second_locked_after_release"] = ch3 != nil
	check(second.Unlock())
	check(second.Destroy())

	// a session of our own, KV acquire/release, renew and destroy
	sid, _ := must2(c.Session().Create(&api.SessionEntry{Name: "worker", TTL: "10s", Behavior: "delete"}, nil))
	ok, _ := must2(c.KV().Acquire(&api.KVPair{Key: "work/item", Value: []byte("mine"), Session: sid}, nil))
	out["acquired"] = ok
	other, _ := must2(c.Session().Create(&api.SessionEntry{Name: "rival", TTL: "10s"}, nil))
	ok, _ = must2(c.KV().Acquire(&api.KVPair{Key: "work/item", Value: []byte("theirs"), Session: other}, nil))
	out["rival_acquired"] = ok
	renewed, _ := must2(c.Session().Renew(sid, nil))
	out["renewed"] = renewed != nil && renewed.ID == sid
	ok, _ = must2(c.KV().Release(&api.KVPair{Key: "work/item", Value: []byte("done"), Session: sid}, nil))
	out["released"] = ok
	pair, _ = must2(c.KV().Get("work/item", nil))
	out["after_release"] = result{"session": pair.Session, "lock_index": pair.LockIndex, "value": string(pair.Value)}
	ok, _ = must2(c.KV().Acquire(&api.KVPair{Key: "work/item", Value: []byte("again"), Session: sid}, nil))
	out["reacquired"] = ok
	_, err = c.Session().Destroy(sid, nil)
	check(err)
	pair, _ = must2(c.KV().Get("work/item", nil))
	out["deleted_with_session"] = pair == nil
	gone, _ := must2(c.Session().Renew(sid, nil))
	out["renew_after_destroy"] = gone != nil
	_, err = c.Session().Destroy(other, nil)
	check(err)
	return out
}

// txn: an atomic KV transaction, and a failing one that changes nothing.
func txn(c *api.Client) result {
	out := result{}
	ok, resp, _, err := c.Txn().Txn(api.TxnOps{
		{KV: &api.KVTxnOp{Verb: api.KVSet, Key: "txn/a", Value: []byte("1")}},
		{KV: &api.KVTxnOp{Verb: api.KVSet, Key: "txn/b", Value: []byte("2"), Flags: 9}},
		{KV: &api.KVTxnOp{Verb: api.KVGet, Key: "txn/a"}},
	}, nil)
	check(err)
	out["ok"] = ok
	if resp != nil && len(resp.Results) == 3 {
		out["got"] = string(resp.Results[2].KV.Value)
	}
	ok, resp, _, err = c.Txn().Txn(api.TxnOps{
		{KV: &api.KVTxnOp{Verb: api.KVSet, Key: "txn/c", Value: []byte("3")}},
		{KV: &api.KVTxnOp{Verb: api.KVCheckNotExists, Key: "txn/a"}},
	}, nil)
	check(err)
	out["failing_ok"] = ok
	if resp != nil && len(resp.Errors) > 0 {
		out["failing_op"] = resp.Errors[0].OpIndex
	}
	pair, _ := must2(c.KV().Get("txn/c", nil))
	out["c_written"] = pair != nil
	pair, _ = must2(c.KV().Get("txn/b", nil))
	out["b_flags"] = pair.Flags
	return out
}

// catalog: external services registered and deregistered through the catalog.
func catalog(c *api.Client) result {
	out := result{}
	_, err := c.Catalog().Register(&api.CatalogRegistration{
		Node: "ext-node", Address: "127.0.0.9",
		Service: &api.AgentService{ID: "ext-1", Service: "external", Port: 7443, Meta: map[string]string{"kind": "saas"}},
		Check:   &api.AgentCheck{Node: "ext-node", CheckID: "ext-alive", Name: "external alive", Status: api.HealthPassing, ServiceID: "ext-1"},
	}, nil)
	check(err)
	entries, _ := must2(c.Health().Service("external", "", true, nil))
	got := []result{}
	for _, e := range entries {
		got = append(got, result{"node": e.Node.Node, "address": e.Service.Address, "port": e.Service.Port, "meta": e.Service.Meta})
	}
	out["passing"] = got
	_, err = c.Catalog().Deregister(&api.CatalogDeregistration{Node: "ext-node", ServiceID: "ext-1"}, nil)
	check(err)
	entries, _ = must2(c.Health().Service("external", "", false, nil))
	out["after_deregister"] = len(entries)
	return out
}

func main() {
	if len(os.Args) != 3 {
		fail(fmt.Errorf("usage: consulgo HOST:PORT SCENARIO"))
	}
	cfg := api.DefaultConfig()
	cfg.Address = os.Args[1]
	c := must(api.NewClient(cfg))
	scenarios := map[string]func(*api.Client) result{
		"waithash": waitHash, "fields": fields, "names": names, "ttlnote": ttlNote, "lock": lock, "txn": txn, "catalog": catalog,
	}
	run, ok := scenarios[os.Args[2]]
	if !ok {
		fail(fmt.Errorf("unknown scenario %q", os.Args[2]))
	}
	check(json.NewEncoder(os.Stdout).Encode(run(c)))
}
