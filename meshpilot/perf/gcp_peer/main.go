// The go-control-plane peer of `meshpilot perf xds-envoys --peer go-control-plane`: a stock
// snapshot-cache ADS server (github.com/envoyproxy/go-control-plane, sotw and delta) serving the
// resources meshpilot serves, read from a file of serialized resources, and changed through an HTTP
// control channel on 127.0.0.1.
//
// Usage: gcppeer -resources FILE -ready-file FILE [-xds-port 0] [-control-port 0]
//
// FILE is JSON: {"shared": {TYPE_URL: [BASE64, ...]}, "nodes": {NODE_ID: {TYPE_URL: [BASE64, ...]}}},
// each BASE64 the serialized resource (the value of its Any). A node's snapshot is the shared
// resources plus its own; every node named in the file has one before any Envoy connects.
//
// POST /update with {"shared": {TYPE_URL: [BASE64, ...]}} replaces the named resources (or adds
// them), and sets a new snapshot (the next version, for every type, as NewSnapshot does) for every
// node, answering once SetSnapshot has returned for all of them: {"version": "N"}.
//
// Once both listeners are up it writes {"xds": PORT, "control": PORT, "pid": PID} to the ready file.
// SIGTERM or SIGINT stops it.
package main

import (
	"context"
	"encoding/base64"
	"encoding/json"
	"flag"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/signal"
	"sort"
	"strconv"
	"sync"
	"syscall"

	clusterv3 "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	endpointv3 "github.com/envoyproxy/go-control-plane/envoy/config/endpoint/v3"
	listenerv3 "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"
	routev3 "github.com/envoyproxy/go-control-plane/envoy/config/route/v3"
	discoverygrpc "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	"github.com/envoyproxy/go-control-plane/pkg/cache/types"
	cachev3 "github.com/envoyproxy/go-control-plane/pkg/cache/v3"
	"github.com/envoyproxy/go-control-plane/pkg/resource/v3"
	serverv3 "github.com/envoyproxy/go-control-plane/pkg/server/v3"
	"google.golang.org/grpc"
	"google.golang.org/protobuf/proto"
)

type resourceSet map[string][]string // type URL -> base64 serialized resources

type resourceFile struct {
	Shared resourceSet            `json:"shared"`
	Nodes  map[string]resourceSet `json:"nodes"`
}

// byName holds the resources of each type by name, so an update replaces what it names.
type byName map[string]map[string]types.Resource

func newMessage(typeURL string) (proto.Message, error) {
	switch typeURL {
	case resource.ClusterType:
		return &clusterv3.Cluster{}, nil
	case resource.EndpointType:
		return &endpointv3.ClusterLoadAssignment{}, nil
	case resource.ListenerType:
		return &listenerv3.Listener{}, nil
	case resource.RouteType:
		return &routev3.RouteConfiguration{}, nil
	case resource.ExtensionConfigType:
		return &corev3.TypedExtensionConfig{}, nil
	}
	return nil, fmt.Errorf("unsupported resource type %q", typeURL)
}

func (b byName) add(set resourceSet) error {
	for typeURL, items := range set {
		if b[typeURL] == nil {
			b[typeURL] = map[string]types.Resource{}
		}
		for i, item := range items {
			raw, err := base64.StdEncoding.DecodeString(item)
			if err != nil {
				return fmt.Errorf("%s[%d]: %w", typeURL, i, err)
			}
			msg, err := newMessage(typeURL)
			if err != nil {
				return err
			}
			if err := proto.Unmarshal(raw, msg); err != nil {
				return fmt.Errorf("%s[%d]: %w", typeURL, i, err)
			}
			b[typeURL][cachev3.GetResourceName(msg)] = msg
		}
	}
	return nil
}

type peer struct {
	cache   cachev3.SnapshotCache
	mu      sync.Mutex
	shared  byName
	nodes   map[string]byName
	version int
}

// publish sets the next version's snapshot for every node. Callers hold p.mu.
func (p *peer) publish(ctx context.Context) error {
	p.version++
	version := strconv.Itoa(p.version)
	ids := make([]string, 0, len(p.nodes))
	for id := range p.nodes {
		ids = append(ids, id)
	}
	sort.Strings(ids)
	for _, id := range ids {
		all := map[resource.Type][]types.Resource{}
		for _, set := range []byName{p.shared, p.nodes[id]} {
			for typeURL, items := range set {
				for _, r := range items {
					all[typeURL] = append(all[typeURL], r)
				}
			}
		}
		snap, err := cachev3.NewSnapshot(version, all)
		if err != nil {
			return err
		}
		if err := p.cache.SetSnapshot(ctx, id, snap); err != nil {
			return fmt.Errorf("node %s: %w", id, err)
		}
	}
	return nil
}

func (p *peer) update(w http.ResponseWriter, r *http.Request) {
	if r.Method != http.MethodPost {
		http.Error(w, "POST only", http.StatusMethodNotAllowed)
		return
	}
	var body struct {
		Shared resourceSet `json:"shared"`
	}
	if err := json.NewDecoder(r.Body).Decode(&body); err != nil {
		http.Error(w, "body: "+err.Error(), http.StatusBadRequest)
		return
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	if err := p.shared.add(body.Shared); err != nil {
		http.Error(w, "shared: "+err.Error(), http.StatusBadRequest)
		return
	}
	if err := p.publish(r.Context()); err != nil {
		http.Error(w, err.Error(), http.StatusInternalServerError)
		return
	}
	w.Header().Set("Content-Type", "application/json")
	fmt.Fprintf(w, "{\"version\": %q}\n", strconv.Itoa(p.version))
}

func run() error {
	resourcesPath := flag.String("resources", "", "the resources to serve (JSON, see the package comment)")
	readyPath := flag.String("ready-file", "", "where to write the bound ports once serving")
	xdsPort := flag.Int("xds-port", 0, "ADS gRPC port on 127.0.0.1 (0: chosen by the OS)")
	controlPort := flag.Int("control-port", 0, "control HTTP port on 127.0.0.1 (0: chosen by the OS)")
	flag.Parse()
	if *resourcesPath == "" || *readyPath == "" {
		return fmt.Errorf("-resources and -ready-file are required")
	}
	data, err := os.ReadFile(*resourcesPath)
	if err != nil {
		return err
	}
	var file resourceFile
	if err := json.Unmarshal(data, &file); err != nil {
		return fmt.Errorf("%s: %w", *resourcesPath, err)
	}
	if len(file.Nodes) == 0 {
		return fmt.Errorf("%s: no nodes", *resourcesPath)
	}

	ctx, cancel := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer cancel()

	p := &peer{cache: cachev3.NewSnapshotCache(true, cachev3.IDHash{}, nil), shared: byName{}, nodes: map[string]byName{}}
	if err := p.shared.add(file.Shared); err != nil {
		return fmt.Errorf("shared: %w", err)
	}
	for id, set := range file.Nodes {
		own := byName{}
		if err := own.add(set); err != nil {
			return fmt.Errorf("node %s: %w", id, err)
		}
		p.nodes[id] = own
	}
	p.mu.Lock()
	err = p.publish(ctx)
	p.mu.Unlock()
	if err != nil {
		return err
	}

	xdsLn, err := net.Listen("tcp", fmt.Sprintf("127.0.0.1:%d", *xdsPort))
	if err != nil {
		return err
	}
	controlLn, err := net.Listen("tcp", fmt.Sprintf("127.0.0.1:%d", *controlPort))
	if err != nil {
		return err
	}
	grpcServer := grpc.NewServer(grpc.MaxConcurrentStreams(1 << 20))
	discoverygrpc.RegisterAggregatedDiscoveryServiceServer(grpcServer, serverv3.NewServer(ctx, p.cache, nil))
	mux := http.NewServeMux()
	mux.HandleFunc("/update", p.update)
	httpServer := &http.Server{Handler: mux}

	errs := make(chan error, 2)
	go func() { errs <- grpcServer.Serve(xdsLn) }()
	go func() { errs <- httpServer.Serve(controlLn) }()

	ready, _ := json.Marshal(map[string]int{
		"xds":     xdsLn.Addr().(*net.TCPAddr).Port,
		"control": controlLn.Addr().(*net.TCPAddr).Port,
		"pid":     os.Getpid(),
	})
	if err := os.WriteFile(*readyPath+".tmp", ready, 0o644); err != nil {
		return err
	}
	if err := os.Rename(*readyPath+".tmp", *readyPath); err != nil {
		return err
	}

	select {
	case <-ctx.Done():
	case err = <-errs:
	}
	_ = httpServer.Close()
	grpcServer.Stop()
	return err
}

func main() {
	if err := run(); err != nil {
		fmt.Fprintln(os.Stderr, "gcppeer:", err)
		os.Exit(1)
	}
}
