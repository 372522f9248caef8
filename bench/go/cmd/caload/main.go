// Command caload is a load generator for the Istio CA API (IstioCertificateService/CreateCertificate)
// written with Go's standard library only: gRPC is HTTP/2 with a 5-byte message prefix and the status in
// trailers, which net/http speaks. A Python grpc.aio client spends about as much CPU per call as the
// server does; on a 2-core machine that halves what the server can show, so bench/istio_ca.py drives the
// server with this instead (the Python client remains, for comparison).
//
// It sends -concurrency calls at a time for -seconds over -conns TLS connections (verifying the server
// against -root with -servername), each call a fixed CSR with "authorization: Bearer bench-<i mod
// identities>", after one warm-up call per identity. A call counts when grpc-status is 0 and the response
// holds at least two cert_chain entries. Output: one JSON line {"ok":..., "failed":..., "seconds":...,
// "ops_s":..., "cpu_seconds":...}.
package main

import (
	"bytes"
	"crypto/tls"
	"crypto/x509"
	"encoding/binary"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net/http"
	"os"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
)

const method = "/istio.v1.auth.IstioCertificateService/CreateCertificate"

// request encodes IstioCertificateRequest{csr = 1} framed as one uncompressed gRPC message.
func request(csr []byte) []byte {
	var msg []byte
	msg = append(msg, 0x0a) // field 1, wire type 2 (length-delimited)
	msg = binary.AppendUvarint(msg, uint64(len(csr)))
	msg = append(msg, csr...)
	frame := make([]byte, 5, 5+len(msg))
	binary.BigEndian.PutUint32(frame[1:], uint32(len(msg)))
	return append(frame, msg...)
}

// chainLength counts the cert_chain (field 1) entries of an IstioCertificateResponse frame.
func chainLength(body []byte) (int, error) {
	if len(body) < 5 || body[0] != 0 {
		return 0, errors.New("no uncompressed gRPC message")
	}
	msg := body[5:]
	if int(binary.BigEndian.Uint32(body[1:5])) != len(msg) {
		return 0, errors.New("truncated gRPC message")
	}
	n := 0
	for len(msg) > 0 {
		key, k := binary.Uvarint(msg)
		if k <= 0 || key&7 != 2 {
			return 0, errors.New("unexpected field")
		}
		size, s := binary.Uvarint(msg[k:])
		if s <= 0 || uint64(len(msg)-k-s) < size {
			return 0, errors.New("bad length")
		}
		if key>>3 == 1 {
			n++
		}
		msg = msg[k+s+int(size):]
	}
	return n, nil
}

type caller struct {
	clients []*http.Client
	url     string
	body    []byte
}

func (c *caller) call(i int, identities int) error {
	req, err := http.NewRequest(http.MethodPost, c.url, bytes.NewReader(c.body))
	if err != nil {
		return err
	}
	req.Header.Set("content-type", "application/grpc")
	req.Header.Set("te", "trailers")
	req.Header.Set("authorization", fmt.Sprintf("Bearer bench-%d", i%identities))
	resp, err := c.clients[i%len(c.clients)].Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		return err
	}
	status := resp.Trailer.Get("grpc-status")
	if status == "" {
		status = resp.Header.Get("grpc-status") // a trailers-only response (an error)
	}
	if status != "0" {
		return fmt.Errorf("grpc-status %q: %s", status, resp.Trailer.Get("grpc-message")+resp.Header.Get("grpc-message"))
	}
	n, err := chainLength(body)
	if err != nil {
		return err
	}
	if n < 2 {
		return fmt.Errorf("cert_chain has %d entries", n)
	}
	return nil
}

func cpuSeconds() float64 {
	var u syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &u); err != nil {
		return 0
	}
	return time.Duration(u.Utime.Nano() + u.Stime.Nano()).Seconds()
}

func main() {
	addr := flag.String("addr", "", "host:port of the gRPC TLS listener")
	rootFile := flag.String("root", "", "PEM roots that verify the server")
	serverName := flag.String("servername", "", "the DNS name the server's certificate carries")
	csrFile := flag.String("csr", "", "PEM CSR sent in every call")
	seconds := flag.Float64("seconds", 3, "measured seconds")
	concurrency := flag.Int("concurrency", 128, "calls in flight")
	conns := flag.Int("conns", 4, "TLS connections")
	identities := flag.Int("identities", 200, "distinct bearer tokens")
	flag.Parse()

	rootPEM, err := os.ReadFile(*rootFile)
	check(err)
	csr, err := os.ReadFile(*csrFile)
	check(err)
	roots := x509.NewCertPool()
	if !roots.AppendCertsFromPEM(rootPEM) {
		check(errors.New("no certificate in " + *rootFile))
	}
	c := &caller{url: "https://" + *addr + method, body: request(csr)}
	for i := 0; i < *conns; i++ {
		// One transport per connection: an http.Transport keeps one HTTP/2 connection per host.
		transport := &http.Transport{
			TLSClientConfig:   &tls.Config{RootCAs: roots, ServerName: *serverName, MinVersion: tls.VersionTLS12},
			ForceAttemptHTTP2: true,
			// No "accept-encoding: gzip": grpc core would gzip every response at the HTTP level (stream
			// compression), which a gRPC client never asks for.
			DisableCompression: true,
		}
		c.clients = append(c.clients, &http.Client{Transport: transport, Timeout: 30 * time.Second})
	}
	var warm sync.WaitGroup
	warmErrors := make(chan error, *identities)
	for i := 0; i < *identities; i++ {
		warm.Add(1)
		go func(i int) {
			defer warm.Done()
			if err := c.call(i, *identities); err != nil {
				warmErrors <- err
			}
		}(i)
	}
	warm.Wait()
	close(warmErrors)
	for err := range warmErrors {
		check(fmt.Errorf("warm-up call failed: %w", err))
	}

	var ok, failed atomic.Int64
	var firstError atomic.Value
	cpuBefore := cpuSeconds()
	started := time.Now()
	deadline := started.Add(time.Duration(*seconds * float64(time.Second)))
	var wg sync.WaitGroup
	for w := 0; w < *concurrency; w++ {
		wg.Add(1)
		go func(w int) {
			defer wg.Done()
			for i := w; time.Now().Before(deadline); i += *concurrency {
				if err := c.call(i, *identities); err != nil {
					failed.Add(1)
					firstError.CompareAndSwap(nil, err.Error())
				} else {
					ok.Add(1)
				}
			}
		}(w)
	}
	wg.Wait()
	elapsed := time.Since(started).Seconds()
	out := map[string]any{"ok": ok.Load(), "failed": failed.Load(), "seconds": elapsed,
		"ops_s": float64(ok.Load()) / elapsed, "cpu_seconds": cpuSeconds() - cpuBefore}
	if e := firstError.Load(); e != nil {
		out["first_error"] = e
	}
	check(json.NewEncoder(os.Stdout).Encode(out))
}

func check(err error) {
	if err != nil {
		fmt.Fprintln(os.Stderr, "caload:", err)
		os.Exit(1)
	}
}
