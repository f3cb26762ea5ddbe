// The h2 mode: HTTP/2 keep-alive GETs, -conns connections carrying -c concurrent streams in all.
//
// The connection is made exactly as in the other modes (CONNECT through -proxy, TLS verified
// against -ca, SNI = -host), but the TLS handshake offers ALPN ["h2", "http/1.1"] and the run
// requires h2: a proxy (or origin) that selected http/1.1 or nothing is reported as such
// ("proto" in the ready and result lines, exit status 3) and no request is timed.
//
// HTTP/2 itself is Go's own client, bundled in net/http: one http.Transport per connection,
// ForceAttemptHTTP2, and a DialTLSContext that hands it the connection dialled (and checked) here.
// Each transport thus holds one HTTP/2 connection that its c/conns workers share as concurrent
// streams. A transport that needs another connection (the first one died, or the server allows
// fewer concurrent streams than we use) dials a new one: counted as a reconnect. Every response
// must come back as HTTP/2 (resp.ProtoMajor == 2), with status 200 and the expected body size.
package main

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"sync"
	"sync/atomic"
	"time"
)

var h2ALPN = []string{"h2", "http/1.1"}

func protoName(p string) string {
	if p == "" {
		return "none (no ALPN selected: HTTP/1.1)"
	}
	return p
}

// notH2 is the error of a connection on which the server (the proxy, or the origin when direct)
// selected another protocol than h2.
type notH2 struct{ got string }

func (e *notH2) Error() string { return "ALPN: negotiated " + protoName(e.got) + ", not h2" }

// dialH2 dials one connection and checks that h2 was negotiated.
func dialH2() (*tls.Conn, error) {
	tc, err := dialTLS(cfg.host, h2ALPN)
	if err != nil {
		return nil, err
	}
	if p := tc.ConnectionState().NegotiatedProtocol; p != "h2" {
		tc.Close()
		return nil, &notH2{p}
	}
	return tc, nil
}

type h2conn struct {
	tr      *http.Transport
	first   *tls.Conn
	handed  int32
	redials *int64
}

func newH2conn(first *tls.Conn, redials *int64) *h2conn {
	h := &h2conn{first: first, redials: redials}
	h.tr = &http.Transport{
		ForceAttemptHTTP2:  true,
		DisableCompression: true, // Accept-Encoding only with -gzip, as in the HTTP/1.1 modes
		DialTLSContext: func(ctx context.Context, network, addr string) (net.Conn, error) {
			if atomic.CompareAndSwapInt32(&h.handed, 0, 1) && h.first != nil {
				return h.first, nil
			}
			atomic.AddInt64(h.redials, 1)
			return dialH2()
		},
	}
	return h
}

func newH2request(ctx context.Context) *http.Request {
	req, err := http.NewRequestWithContext(ctx, "GET", "https://"+cfg.host+cfg.path, nil)
	if err != nil {
		die("request: %v", err)
	}
	req.Header.Set("User-Agent", "httpsdump-bench/1")
	req.Header.Set("Accept", "*/*")
	if cfg.gzip {
		req.Header.Set("Accept-Encoding", "gzip")
	}
	return req
}

// get does one request on the transport (a new stream on its connection) and reads the body.
func (h *h2conn) get(req *http.Request) (int64, error) {
	resp, err := h.tr.RoundTrip(req)
	if err != nil {
		return 0, err
	}
	n, err := io.Copy(io.Discard, resp.Body)
	resp.Body.Close()
	if err != nil {
		return n, err
	}
	if resp.ProtoMajor != 2 {
		return n, fmt.Errorf("response over %s, not HTTP/2", resp.Proto)
	}
	if resp.StatusCode != 200 {
		return n, fmt.Errorf("status %d", resp.StatusCode)
	}
	if cfg.expectSize >= 0 && n != cfg.expectSize {
		return n, fmt.Errorf("body %d bytes, expected %d", n, cfg.expectSize)
	}
	return n, nil
}

func runH2() {
	nconn := cfg.conns
	if nconn < 1 {
		nconn = 1
	}
	if nconn > cfg.conc {
		nconn = cfg.conc
	}
	ec := &errCounter{}
	var redials int64
	conns := make([]*h2conn, nconn)
	proto, wrong := "h2", 0
	for i := range conns {
		tc, err := dialH2()
		if err != nil {
			ec.add(err)
			var e *notH2
			if errors.As(err, &e) {
				proto = e.got
				wrong++
			}
			continue
		}
		conns[i] = newH2conn(tc, &redials)
	}
	if wrong > 0 {
		// Not HTTP/2: nothing to time. Say so in the harness's lines and on stderr, and exit 3.
		msg := fmt.Sprintf("%d of %d connections negotiated %s, not h2: no HTTP/2 between the client and the proxy (or origin)",
			wrong, nconn, protoName(proto))
		waitGo(map[string]interface{}{"warm_errors": ec.n, "first_error": ec.first, "proto": proto, "not_h2": msg})
		emit(&result{Mode: "h2", Errors: int64(wrong), FirstError: msg, Proto: proto, NotH2: msg, Conns: nconn})
		fmt.Fprintln(os.Stderr, "loadclient h2: "+msg)
		os.Exit(3)
	}
	for i := range conns {
		if conns[i] == nil { // its dial failed (counted): the transport dials its own when used
			conns[i] = newH2conn(nil, &redials)
		}
	}
	// Warm-up: one request (stream) on each connection, so that the timed phase starts with every
	// HTTP/2 connection established and its SETTINGS exchanged.
	warmCtx, cancelWarm := context.WithTimeout(context.Background(), 60*time.Second)
	for i, h := range conns {
		if _, err := h.get(newH2request(warmCtx)); err != nil {
			ec.add(fmt.Errorf("warm-up on connection %d: %w", i, err))
		}
	}
	cancelWarm()
	waitGo(map[string]interface{}{"warm_errors": ec.n, "first_error": ec.first, "proto": proto,
		"conns": nconn, "streams": cfg.conc})
	warmRedials := atomic.LoadInt64(&redials)
	ec = &errCounter{}
	var r result
	r.Mode = "h2"
	r.Proto = proto
	r.Conns = nconn
	var issued int64
	lat := make([][]float64, cfg.conc)
	var wg sync.WaitGroup
	cpu0, t0 := cpuSeconds(), time.Now()
	deadline := t0.Add(cfg.dur)
	// Every request of the run must be done 60 s after the timed phase would end.
	ctx, cancel := context.WithDeadline(context.Background(), deadline.Add(60*time.Second))
	defer cancel()
	for i := 0; i < cfg.conc; i++ {
		wg.Add(1)
		go func(i int) {
			defer wg.Done()
			h := conns[i%nconn]
			req := newH2request(ctx)
			for time.Now().Before(deadline) && atomic.AddInt64(&issued, 1) <= cfg.n {
				s := time.Now()
				n, err := h.get(req)
				if err != nil {
					ec.add(err)
					if ctx.Err() != nil {
						return
					}
					time.Sleep(10 * time.Millisecond)
					continue
				}
				r.record(&lat[i], s, n)
			}
		}(i)
	}
	wg.Wait()
	r.Reconnects = atomic.LoadInt64(&redials) - warmRedials
	finish(&r, lat, ec, t0, cpu0)
	for _, h := range conns {
		h.tr.CloseIdleConnections()
	}
}
