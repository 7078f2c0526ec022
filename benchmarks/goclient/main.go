// allocclient calls the device plugin's Allocate over its unix socket the way the kubelet does
// (grpc-go, one connection, one ContainerAllocateRequest per call) and prints one latency per line,
// in microseconds. The request bytes come pre-encoded (hex) from benchmarks/allocate_latency.py, so
// this client needs no generated code: a pass-through codec sends them as they are.
//
//	go run main.go SOCKET CALLS HEXREQUEST [HEXREQUEST...]
package main

import (
	"context"
	"encoding/hex"
	"fmt"
	"net"
	"os"
	"strconv"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/encoding"
)

type raw []byte

type rawCodec struct{}

func (rawCodec) Marshal(v interface{}) ([]byte, error) { return *(v.(*raw)), nil }
func (rawCodec) Unmarshal(data []byte, v interface{}) error {
	*(v.(*raw)) = append((*(v.(*raw)))[:0], data...)
	return nil
}
func (rawCodec) Name() string { return "proto" } // the plugin expects application/grpc+proto

func main() {
	if len(os.Args) < 4 {
		fmt.Fprintln(os.Stderr, "usage: allocclient SOCKET CALLS HEXREQUEST...")
		os.Exit(2)
	}
	encoding.RegisterCodec(rawCodec{})
	socket, calls := os.Args[1], os.Args[2]
	n, err := strconv.Atoi(calls)
	if err != nil {
		panic(err)
	}
	var requests []raw
	for _, h := range os.Args[3:] {
		b, err := hex.DecodeString(h)
		if err != nil {
			panic(err)
		}
		requests = append(requests, raw(b))
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	conn, err := grpc.DialContext(ctx, socket, grpc.WithInsecure(), grpc.WithBlock(),
		grpc.WithContextDialer(func(ctx context.Context, addr string) (net.Conn, error) {
			return (&net.Dialer{}).DialContext(ctx, "unix", addr)
		}))
	if err != nil {
		panic(err)
	}
	defer conn.Close()
	out := os.Stdout
	var reply raw
	for i := -1; i < n; i++ { // call -1 warms the connection up and is not reported
		req := requests[(i+len(requests))%len(requests)]
		t0 := time.Now()
		if err := conn.Invoke(context.Background(), "/v1beta1.DevicePlugin/Allocate", &req, &reply, grpc.ForceCodec(rawCodec{})); err != nil {
			panic(err)
		}
		if i >= 0 {
			fmt.Fprintln(out, time.Since(t0).Microseconds())
		}
	}
}
