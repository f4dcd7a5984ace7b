// The load generator of `meshpilot perf registry`: HashiCorp's Go client (github.com/hashicorp/consul/api)
// registering or deregistering many services with a fixed number of requests in flight.
//
// Usage: consulload -addr HOST:PORT -phase register|deregister -n N -c C [-prefix P] [-per-service K]
//
// Registration i is of service P<i/K>, id P<i>-1, with a TTL check, the registration the Python
// client of the benchmark sends (K = 1: every registration creates its service). Each of the C workers holds one kept-alive connection (the client's default pool
// keeps only GOMAXPROCS+1 idle connections and would open new ones under load). It prints one JSON
// object: the phase's wall time, each request's latency in microseconds, and the CPU this process
// used, so the benchmark can show that the load generator is not what limits the rate. A failed
// request exits 1 with the error on stderr.
package main

import (
	"encoding/json"
	"flag"
	"fmt"
	"net/http"
	"os"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/hashicorp/consul/api"
)

type report struct {
	Phase       string  `json:"phase"`
	N           int     `json:"n"`
	Concurrency int     `json:"concurrency"`
	Seconds     float64 `json:"seconds"`
	LatenciesUs []int64 `json:"latencies_us"`
	CPUSeconds  float64 `json:"cpu_s"`
}

func cpuSeconds() float64 {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		return 0
	}
	tv := func(t syscall.Timeval) float64 { return float64(t.Sec) + float64(t.Usec)/1e6 }
	return tv(ru.Utime) + tv(ru.Stime)
}

func main() {
	addr := flag.String("addr", "127.0.0.1:8500", "the Consul API")
	phase := flag.String("phase", "register", "register or deregister")
	n := flag.Int("n", 1000, "services")
	c := flag.Int("c", 16, "requests in flight")
	prefix := flag.String("prefix", "bench-", "service name prefix")
	perService := flag.Int("per-service", 1, "registrations per service")
	flag.Parse()
	if *perService < 1 {
		fmt.Fprintf(os.Stderr, "-per-service: expected at least 1, got %d\n", *perService)
		os.Exit(2)
	}
	if *phase != "register" && *phase != "deregister" {
		fmt.Fprintf(os.Stderr, "-phase: expected register or deregister, got %q\n", *phase)
		os.Exit(2)
	}

	cfg := api.DefaultConfig()
	cfg.Address = *addr
	transport := cfg.Transport
	transport.MaxIdleConns = *c * 2
	transport.MaxIdleConnsPerHost = *c * 2
	transport.MaxConnsPerHost = *c
	cfg.HttpClient = &http.Client{Transport: transport}
	client, err := api.NewClient(cfg)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	agent := client.Agent()

	latencies := make([]int64, *n)
	var next atomic.Int64
	var failed atomic.Value
	var wg sync.WaitGroup
	cpu0 := cpuSeconds()
	t0 := time.Now()
	for w := 0; w < *c; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				i := int(next.Add(1) - 1)
				if i >= *n || failed.Load() != nil {
					return
				}
				id := fmt.Sprintf("%s%d-1", *prefix, i)
				start := time.Now()
				var err error
				if *phase == "register" {
					err = agent.ServiceRegister(&api.AgentServiceRegistration{
						ID: id, Name: fmt.Sprintf("%s%d", *prefix, i / *perService), Address: "127.0.0.1", Port: 20000 + i%40000,
						Tags: []string{"bench"}, Meta: map[string]string{"version": "1"},
						Check: &api.AgentServiceCheck{TTL: "60s"},
					})
				} else {
					err = agent.ServiceDeregister(id)
				}
				latencies[i] = time.Since(start).Microseconds()
				if err != nil {
					failed.Store(fmt.Errorf("%s %s: %w", *phase, id, err))
					return
				}
			}
		}()
	}
	wg.Wait()
	elapsed := time.Since(t0).Seconds()
	if e := failed.Load(); e != nil {
		fmt.Fprintln(os.Stderr, e)
		os.Exit(1)
	}
	out := report{Phase: *phase, N: *n, Concurrency: *c, Seconds: elapsed, LatenciesUs: latencies, CPUSeconds: cpuSeconds() - cpu0}
	if err := json.NewEncoder(os.Stdout).Encode(out); err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
}
