// loadclient: the benchmark's HTTPS load client (Go standard library only).
//
// It speaks raw CONNECT + crypto/tls so that every byte is under control:
//   - TLS is always verified against -ca (the proxy's CA, or the bench CA when direct);
//   - SNI and Host carry -host (a *.bench.test name) while the TCP connection, or the CONNECT,
//     goes to -connect (127.0.0.1:PORT of the origin);
//   - keep-alive workers keep their tunnel for the whole run and count every reconnect;
//   - no TLS session resumption: every new connection is a full handshake on both sides.
//
// Modes (all bounded by -n and -t, and refusing any address outside 127.0.0.0/8):
//
//	ka       keep-alive GETs at concurrency -c
//	newconn  a new TCP connection (+ CONNECT + TLS) per request, at concurrency -c
//	mint     first contact with -names distinct host names (-name-fmt), one request each
//	big      one download of -path (MB/s)
//	idle     -c intercepted connections: handshake, one request, then held open
//	h2       HTTP/2 keep-alive GETs: -c concurrent streams on -conns connections (h2.go)
//	tunnel   a non-inspecting CONNECT tunnel (baseline target), until stdin closes or -t
//
// With -sync, the client does its warm-up (connections opened, one request each), prints one JSON
// line {"ready":...} and waits for a line on stdin before the timed phase, so that the harness can
// read the proxy's CPU time and RSS exactly around the timed phase. The result is one JSON line.
package main

import (
	"bufio"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
)

type config struct {
	mode       string
	proxy      string
	connect    string
	host       string
	path       string
	caFile     string
	conc       int
	n          int64
	dur        time.Duration
	names      int
	nameFmt    string
	gzip       bool
	expectSize int64
	sync       bool
	listen     string
	conns      int
	pool       *x509.CertPool
}

var cfg config

type result struct {
	Mode       string  `json:"mode"`
	OK         int64   `json:"ok"`
	Errors     int64   `json:"errors"`
	FirstError string  `json:"first_error,omitempty"`
	Reconnects int64   `json:"reconnects"`
	Elapsed    float64 `json:"elapsed_s"`
	Rate       float64 `json:"rate"`
	P50        float64 `json:"p50_ms"`
	P99        float64 `json:"p99_ms"`
	Bytes      int64   `json:"bytes"`
	MBps       float64 `json:"mb_per_s"`
	CPU        float64 `json:"client_cpu_s"`
	Conns      int     `json:"conns,omitempty"`
	AliveAfter int     `json:"alive_after,omitempty"`
	Proto      string  `json:"proto,omitempty"`  // h2: the negotiated ALPN protocol
	NotH2      string  `json:"not_h2,omitempty"` // h2: why the run could not be made over HTTP/2
}

type errCounter struct {
	n     int64
	mu    sync.Mutex
	first string
}

func (e *errCounter) add(err error) {
	atomic.AddInt64(&e.n, 1)
	e.mu.Lock()
	if e.first == "" {
		e.first = err.Error()
	}
	e.mu.Unlock()
}

func die(format string, a ...interface{}) {
	fmt.Fprintf(os.Stderr, "loadclient: "+format+"\n", a...)
	os.Exit(2)
}

func mustLoopback(addr string) {
	if addr == "" {
		return
	}
	h, _, err := net.SplitHostPort(addr)
	if err != nil {
		die("bad address %q: %v", addr, err)
	}
	ip := net.ParseIP(h)
	if ip == nil || !ip.IsLoopback() {
		die("refusing %q: only 127.0.0.0/8 or ::1 addresses are allowed", addr)
	}
}

func cpuSeconds() float64 {
	var ru syscall.Rusage
	syscall.Getrusage(syscall.RUSAGE_SELF, &ru)
	tv := func(t syscall.Timeval) float64 { return float64(t.Sec) + float64(t.Usec)/1e6 }
	return tv(ru.Utime) + tv(ru.Stime)
}

// ---- connections --------------------------------------------------------------------------------

type conn struct {
	tc *tls.Conn
	br *bufio.Reader
}

func (c *conn) Close() { c.tc.Close() }

// dial opens an HTTP/1.1 connection: ALPN offers http/1.1 only, and a server that selected
// anything else (it must not) is an error, so the HTTP/1.1 modes never measure another protocol.
func dial(host string) (*conn, error) {
	tc, err := dialTLS(host, []string{"http/1.1"})
	if err != nil {
		return nil, err
	}
	if p := tc.ConnectionState().NegotiatedProtocol; p != "" && p != "http/1.1" {
		tc.Close()
		return nil, fmt.Errorf("ALPN: server selected %q, not http/1.1", p)
	}
	return &conn{tc: tc, br: bufio.NewReaderSize(tc, 64<<10)}, nil
}

// dialTLS: TCP to the origin, or to the proxy + CONNECT to the origin, then a verified TLS
// handshake with SNI host offering the ALPN protocols alpn.
func dialTLS(host string, alpn []string) (*tls.Conn, error) {
	d := net.Dialer{Timeout: 10 * time.Second}
	addr := cfg.connect
	if cfg.proxy != "" {
		addr = cfg.proxy
	}
	raw, err := d.Dial("tcp", addr)
	if err != nil {
		return nil, err
	}
	raw.SetDeadline(time.Now().Add(30 * time.Second))
	if cfg.proxy != "" {
		fmt.Fprintf(raw, "CONNECT %s HTTP/1.1\r\nHost: %s\r\n\r\n", cfg.connect, cfg.connect)
		br := bufio.NewReader(raw)
		resp, err := http.ReadResponse(br, &http.Request{Method: "CONNECT"})
		if err != nil {
			raw.Close()
			return nil, fmt.Errorf("CONNECT: %w", err)
		}
		if resp.StatusCode != 200 {
			raw.Close()
			return nil, fmt.Errorf("CONNECT: status %d", resp.StatusCode)
		}
		if br.Buffered() > 0 {
			raw.Close()
			return nil, errors.New("CONNECT: unexpected bytes after the 200")
		}
	}
	tc := tls.Client(raw, &tls.Config{
		ServerName: host,
		RootCAs:    cfg.pool,
		NextProtos: alpn,
		MinVersion: tls.VersionTLS12,
	})
	if err := tc.Handshake(); err != nil {
		raw.Close()
		return nil, fmt.Errorf("TLS handshake (%s): %w", host, err)
	}
	raw.SetDeadline(time.Time{})
	return tc, nil
}

// get sends one GET and reads the whole response. It returns the body size and whether the
// connection may be reused.
func (c *conn) get(host, path string, closeConn bool) (int64, bool, error) {
	c.tc.SetDeadline(time.Now().Add(60 * time.Second))
	defer c.tc.SetDeadline(time.Time{})
	var b strings.Builder
	b.WriteString("GET " + path + " HTTP/1.1\r\nHost: " + host + "\r\nUser-Agent: httpsdump-bench/1\r\nAccept: */*\r\n")
	if cfg.gzip {
		b.WriteString("Accept-Encoding: gzip\r\n")
	}
	if closeConn {
		b.WriteString("Connection: close\r\n")
	}
	b.WriteString("\r\n")
	if _, err := io.WriteString(c.tc, b.String()); err != nil {
		return 0, false, err
	}
	resp, err := http.ReadResponse(c.br, nil)
	if err != nil {
		return 0, false, err
	}
	n, err := io.Copy(io.Discard, resp.Body)
	resp.Body.Close()
	if err != nil {
		return n, false, err
	}
	if resp.StatusCode != 200 {
		return n, false, fmt.Errorf("status %d", resp.StatusCode)
	}
	if cfg.expectSize >= 0 && n != cfg.expectSize {
		return n, false, fmt.Errorf("body %d bytes, expected %d", n, cfg.expectSize)
	}
	return n, !resp.Close && !closeConn, nil
}

// ---- sync with the harness ----------------------------------------------------------------------

var stdin = bufio.NewReader(os.Stdin)

func emit(v interface{}) {
	b, _ := json.Marshal(v)
	os.Stdout.Write(append(b, '\n'))
}

func waitGo(ready map[string]interface{}) {
	if !cfg.sync {
		return
	}
	ready["ready"] = true
	if _, ok := ready["stage"]; !ok {
		ready["stage"] = "warm"
	}
	emit(ready)
	got := make(chan struct{})
	go func() { stdin.ReadString('\n'); close(got) }()
	select {
	case <-got:
	case <-time.After(120 * time.Second):
		die("no go from the harness within 120 s")
	}
}

func percentile(sorted []float64, p float64) float64 {
	if len(sorted) == 0 {
		return 0
	}
	i := int(p*float64(len(sorted))+0.5) - 1
	if i < 0 {
		i = 0
	}
	if i >= len(sorted) {
		i = len(sorted) - 1
	}
	return sorted[i]
}

func finish(r *result, lat [][]float64, ec *errCounter, t0 time.Time, cpu0 float64) {
	r.Elapsed = time.Since(t0).Seconds()
	r.CPU = cpuSeconds() - cpu0
	r.Errors = ec.n
	r.FirstError = ec.first
	var all []float64
	for _, l := range lat {
		all = append(all, l...)
	}
	sort.Float64s(all)
	r.P50, r.P99 = percentile(all, 0.50), percentile(all, 0.99)
	if r.Elapsed > 0 {
		r.Rate = float64(r.OK) / r.Elapsed
		r.MBps = float64(r.Bytes) / r.Elapsed / 1e6
	}
	emit(r)
}

// record counts one successful request that started at s and read n body bytes.
func (r *result) record(lat *[]float64, s time.Time, n int64) {
	*lat = append(*lat, float64(time.Since(s).Microseconds())/1000)
	atomic.AddInt64(&r.OK, 1)
	atomic.AddInt64(&r.Bytes, n)
}

// ---- modes --------------------------------------------------------------------------------------

// openWarm opens n kept-alive connections, at most par at a time, each with one request done.
// Failed ones are counted in ec and left nil.
func openWarm(n, par int, ec *errCounter) []*conn {
	conns := make([]*conn, n)
	sem := make(chan struct{}, par)
	var wg sync.WaitGroup
	for i := range conns {
		wg.Add(1)
		sem <- struct{}{}
		go func(i int) {
			defer wg.Done()
			defer func() { <-sem }()
			c, err := dial(cfg.host)
			if err == nil {
				_, _, err = c.get(cfg.host, cfg.path, false)
			}
			if err != nil {
				ec.add(err)
				if c != nil {
					c.Close()
				}
				return
			}
			conns[i] = c
		}(i)
	}
	wg.Wait()
	return conns
}

func runKA() {
	ec := &errCounter{}
	conns := openWarm(cfg.conc, cfg.conc, ec) // every tunnel open and used once before the clock starts
	var wg sync.WaitGroup
	waitGo(map[string]interface{}{"warm_errors": ec.n, "first_error": ec.first})
	ec = &errCounter{}
	var r result
	r.Mode = "ka"
	var issued int64
	lat := make([][]float64, cfg.conc)
	cpu0, t0 := cpuSeconds(), time.Now()
	deadline := t0.Add(cfg.dur)
	for i := 0; i < cfg.conc; i++ {
		wg.Add(1)
		go func(i int) {
			defer wg.Done()
			c := conns[i]
			for time.Now().Before(deadline) && atomic.AddInt64(&issued, 1) <= cfg.n {
				if c == nil {
					var err error
					if c, err = dial(cfg.host); err != nil {
						ec.add(err)
						time.Sleep(10 * time.Millisecond)
						continue
					}
					atomic.AddInt64(&r.Reconnects, 1)
				}
				s := time.Now()
				n, reuse, err := c.get(cfg.host, cfg.path, false)
				if err != nil {
					ec.add(err)
					c.Close()
					c = nil
					continue
				}
				r.record(&lat[i], s, n)
				if !reuse {
					c.Close()
					c = nil
				}
			}
			if c != nil {
				c.Close()
			}
		}(i)
	}
	wg.Wait()
	finish(&r, lat, ec, t0, cpu0)
}

// oneShot: new connection, one request with Connection: close.
func oneShot(host string) (int64, error) {
	c, err := dial(host)
	if err != nil {
		return 0, err
	}
	defer c.Close()
	n, _, err := c.get(host, cfg.path, true)
	return n, err
}

func runNewconn(mint bool) {
	warmHost := cfg.host
	if mint {
		warmHost = fmt.Sprintf(cfg.nameFmt, "warm")
	}
	if _, err := oneShot(warmHost); err != nil {
		waitGo(map[string]interface{}{"warm_errors": 1, "first_error": err.Error()})
	} else {
		waitGo(map[string]interface{}{"warm_errors": 0})
	}
	ec := &errCounter{}
	var r result
	r.Mode = cfg.mode
	limit := cfg.n
	if mint {
		limit = int64(cfg.names)
	}
	var issued int64
	lat := make([][]float64, cfg.conc)
	var wg sync.WaitGroup
	cpu0, t0 := cpuSeconds(), time.Now()
	deadline := t0.Add(cfg.dur)
	for i := 0; i < cfg.conc; i++ {
		wg.Add(1)
		go func(i int) {
			defer wg.Done()
			for time.Now().Before(deadline) {
				k := atomic.AddInt64(&issued, 1)
				if k > limit {
					return
				}
				host := cfg.host
				if mint {
					host = fmt.Sprintf(cfg.nameFmt, strconv.FormatInt(k, 10))
				}
				s := time.Now()
				n, err := oneShot(host)
				if err != nil {
					ec.add(err)
					continue
				}
				r.record(&lat[i], s, n)
			}
		}(i)
	}
	wg.Wait()
	finish(&r, lat, ec, t0, cpu0)
}

func runBig() {
	ec := &errCounter{}
	c, err := dial(cfg.host)
	if err == nil {
		save := cfg.expectSize
		cfg.expectSize = -1
		_, _, err = c.get(cfg.host, "/small", false)
		cfg.expectSize = save
	}
	if err != nil {
		die("warm-up: %v", err)
	}
	waitGo(map[string]interface{}{"warm_errors": 0})
	var r result
	r.Mode = "big"
	cpu0, t0 := cpuSeconds(), time.Now()
	n, _, err := c.get(cfg.host, cfg.path, true)
	r.Bytes = n
	if err != nil {
		ec.add(err)
	} else {
		r.OK = 1
	}
	c.Close()
	finish(&r, nil, ec, t0, cpu0)
}

func runIdle() {
	ec := &errCounter{}
	// Stage "warm": one request on a connection that is then closed, so that the leaf certificate
	// and per-host state exist before the harness reads the baseline RSS.
	if _, err := oneShot(cfg.host); err != nil {
		ec.add(err)
	}
	waitGo(map[string]interface{}{"stage": "warm", "warm_errors": ec.n, "first_error": ec.first})
	cpu0, t0 := cpuSeconds(), time.Now()
	conns := openWarm(cfg.conc, 20, ec)
	sem := make(chan struct{}, 20)
	var wg sync.WaitGroup
	open := 0
	for _, c := range conns {
		if c != nil {
			open++
		}
	}
	waitGo(map[string]interface{}{"stage": "open", "open": open, "warm_errors": ec.n, "first_error": ec.first,
		"setup_s": time.Since(t0).Seconds()})
	// After the measurement: every held connection must still work (the proxy kept it).
	var r result
	r.Mode = "idle"
	r.Conns = open
	var alive int64
	for _, c := range conns {
		if c == nil {
			continue
		}
		wg.Add(1)
		sem <- struct{}{}
		go func(c *conn) {
			defer wg.Done()
			defer func() { <-sem }()
			if _, _, err := c.get(cfg.host, cfg.path, true); err != nil {
				ec.add(fmt.Errorf("after idle: %w", err))
			} else {
				atomic.AddInt64(&alive, 1)
			}
			c.Close()
		}(c)
	}
	wg.Wait()
	r.AliveAfter = int(alive)
	r.OK = alive
	finish(&r, nil, ec, t0, cpu0)
}

// ---- a non-inspecting CONNECT tunnel (baseline) --------------------------------------------------

func runTunnel() {
	ln, err := net.Listen("tcp", cfg.listen)
	if err != nil {
		die("listen: %v", err)
	}
	emit(map[string]interface{}{"listening": ln.Addr().String()})
	go func() { io.Copy(io.Discard, os.Stdin); os.Exit(0) }() // the harness closes stdin to stop us
	go func() { time.Sleep(cfg.dur); os.Exit(0) }()
	for {
		c, err := ln.Accept()
		if err != nil {
			continue
		}
		go tunnel(c)
	}
}

func tunnel(c net.Conn) {
	defer c.Close()
	br := bufio.NewReader(c)
	req, err := http.ReadRequest(br)
	if err != nil || req.Method != "CONNECT" {
		io.WriteString(c, "HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
		return
	}
	h, _, err := net.SplitHostPort(req.Host)
	if ip := net.ParseIP(h); err != nil || ip == nil || !ip.IsLoopback() {
		io.WriteString(c, "HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
		return
	}
	up, err := net.DialTimeout("tcp", req.Host, 10*time.Second)
	if err != nil {
		io.WriteString(c, "HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
		return
	}
	defer up.Close()
	io.WriteString(c, "HTTP/1.1 200 Connection established\r\n\r\n")
	done := make(chan struct{}, 2)
	go func() { io.Copy(up, br); up.(*net.TCPConn).CloseWrite(); done <- struct{}{} }()
	go func() { io.Copy(c, up); c.(*net.TCPConn).CloseWrite(); done <- struct{}{} }()
	<-done
	<-done
}

func main() {
	if len(os.Args) < 2 {
		die("usage: loadclient ka|newconn|mint|big|idle|h2|tunnel [flags]")
	}
	cfg.mode = os.Args[1]
	fs := flag.NewFlagSet(cfg.mode, flag.ExitOnError)
	fs.StringVar(&cfg.proxy, "proxy", "", "proxy address (empty: connect directly)")
	fs.StringVar(&cfg.connect, "connect", "127.0.0.1:8443", "origin address: the CONNECT target, or dialled directly")
	fs.StringVar(&cfg.host, "host", "bench.test", "SNI and Host name")
	fs.StringVar(&cfg.path, "path", "/small", "request path")
	fs.StringVar(&cfg.caFile, "ca", "", "CA file (PEM) that the server certificate must chain to")
	fs.IntVar(&cfg.conc, "c", 1, "concurrency (idle: number of connections; h2: streams in all)")
	fs.IntVar(&cfg.conns, "conns", 2, "h2: HTTP/2 connections that the -c concurrent streams share")
	fs.Int64Var(&cfg.n, "n", 1000000, "maximum requests")
	dur := fs.Float64("t", 10, "maximum seconds of the timed phase (tunnel: lifetime)")
	fs.IntVar(&cfg.names, "names", 1000, "mint: number of distinct names")
	fs.StringVar(&cfg.nameFmt, "name-fmt", "n%s.bench.test", "mint: host name format (%s = index)")
	fs.BoolVar(&cfg.gzip, "gzip", false, "send Accept-Encoding: gzip")
	fs.Int64Var(&cfg.expectSize, "expect-size", -1, "expected body size (-1: any)")
	fs.BoolVar(&cfg.sync, "sync", false, "print ready after warm-up and wait for a line on stdin")
	fs.StringVar(&cfg.listen, "listen", "127.0.0.1:0", "tunnel: listen address")
	fs.Parse(os.Args[2:])
	cfg.dur = time.Duration(*dur * float64(time.Second))
	mustLoopback(cfg.proxy)
	mustLoopback(cfg.connect)
	mustLoopback(cfg.listen)
	if cfg.mode == "tunnel" {
		runTunnel()
		return
	}
	pem, err := os.ReadFile(cfg.caFile)
	if err != nil {
		die("-ca: %v", err)
	}
	cfg.pool = x509.NewCertPool()
	if !cfg.pool.AppendCertsFromPEM(pem) {
		die("-ca %s: no certificate found", cfg.caFile)
	}
	if cfg.conc < 1 {
		cfg.conc = 1
	}
	switch cfg.mode {
	case "ka":
		runKA()
	case "newconn":
		runNewconn(false)
	case "mint":
		runNewconn(true)
	case "big":
		runBig()
	case "idle":
		runIdle()
	case "h2":
		runH2()
	default:
		die("unknown mode %q", cfg.mode)
	}
}
