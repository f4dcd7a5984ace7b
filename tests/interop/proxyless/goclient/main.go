// A proxyless grpc-go client for the interop tests: calls xds:///<target> from a few goroutines
// and prints one line per call, "<unix time> <server name or error:CODE>", until stdin closes or
// the time limit passes. GRPC_XDS_BOOTSTRAP must point at the control plane's bootstrap file.
// Messages are encoded by hand (two string fields), so no generated code is needed.
package main

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"os"
	"strconv"
	"strings"
	"sync"
	"time"
	"unicode"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/encoding"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/encoding/protowire"

	_ "google.golang.org/grpc/xds" // registers the xds:/// resolver and its balancers
)

// rawCodec sends and receives already-encoded protobuf bytes.
type rawCodec struct{}

func (rawCodec) Marshal(v any) ([]byte, error) { return *(v.(*[]byte)), nil }
func (rawCodec) Unmarshal(b []byte, v any) error {
	*(v.(*[]byte)) = append([]byte(nil), b...)
	return nil
}
func (rawCodec) Name() string { return "proto" }

// codeName spells a status code as grpcio does (UNAVAILABLE, DEADLINE_EXCEEDED).
func codeName(c codes.Code) string {
	var b strings.Builder
	for i, r := range c.String() {
		if i > 0 && unicode.IsUpper(r) {
			b.WriteByte('_')
		}
		b.WriteRune(unicode.ToUpper(r))
	}
	return b.String()
}

// server returns EchoReply.server (field 1).
func server(reply []byte) string {
	for len(reply) > 0 {
		num, typ, n := protowire.ConsumeTag(reply)
		if n < 0 {
			return ""
		}
		reply = reply[n:]
		if num == 1 && typ == protowire.BytesType {
			v, _ := protowire.ConsumeBytes(reply)
			return string(v)
		}
		n = protowire.ConsumeFieldValue(num, typ, reply)
		if n < 0 {
			return ""
		}
		reply = reply[n:]
	}
	return ""
}

func main() {
	encoding.RegisterCodec(rawCodec{})
	target, limit := os.Args[1], os.Args[2]
	seconds, err := strconv.ParseFloat(limit, 64)
	if err != nil {
		fmt.Fprintln(os.Stderr, "limit:", err)
		os.Exit(2)
	}
	conn, err := grpc.NewClient("xds:///"+target, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		fmt.Fprintln(os.Stderr, "dial:", err)
		os.Exit(1)
	}
	defer conn.Close()

	ctx, cancel := context.WithTimeout(context.Background(), time.Duration(seconds*float64(time.Second)))
	defer cancel()
	go func() { io.Copy(io.Discard, os.Stdin); cancel() }()

	request := protowire.AppendString(protowire.AppendTag(nil, 1, protowire.BytesType), "hi")
	out := bufio.NewWriter(os.Stdout)
	var mu sync.Mutex
	var wg sync.WaitGroup
	for w := 0; w < 4; w++ { // a few calls in flight at once, as an application would have
		wg.Add(1)
		go func() {
			defer wg.Done()
			for ctx.Err() == nil {
				callCtx, done := context.WithTimeout(ctx, 5*time.Second)
				var reply []byte
				err := conn.Invoke(callCtx, "/meshpilot.test.echo.Echo/Call", &request, &reply, grpc.WaitForReady(true))
				done()
				if ctx.Err() != nil {
					return
				}
				outcome := server(reply)
				if err != nil {
					st := status.Convert(err)
					outcome = "error:" + codeName(st.Code())
					fmt.Fprintf(os.Stderr, "%.6f %s %s\n", float64(time.Now().UnixNano())/1e9, outcome, st.Message())
				}
				mu.Lock()
				fmt.Fprintf(out, "%.6f %s\n", float64(time.Now().UnixNano())/1e9, outcome)
				out.Flush()
				mu.Unlock()
				if err != nil {
					time.Sleep(10 * time.Millisecond)
				}
			}
		}()
	}
	wg.Wait()
}
