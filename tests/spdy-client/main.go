// spdy-client: the client side of Kubernetes' streaming protocols (exec, port-forward) over
// SPDY/3.1, built on Go's spdystream (Debian: golang-github-docker-spdystream-dev), the
// library kubelet, crictl and critest use. The tests drive the agent's CRI streaming server
// with it, so the server is checked against an implementation that is not its own.
//
//	spdy-client exec URL [-stdin] [-tty] [-no-stdout] [-stderr] [-resize WxH]
//	spdy-client portforward URL PORT [REQUEST_ID]
//	spdy-client portforward-ws URL PORT
//
// portforward-ws carries the same SPDY connection inside a WebSocket (subprotocol
// SPDY/3.1+portforward.k8s.io, KEP-4006), on Debian's gorilla/websocket.
//
// exec copies its stdin to the stdin stream, the stdout and stderr streams to its own, and
// prints the error stream's content on stderr after "STATUS ". portforward copies its stdin to
// the data stream and the data stream to its stdout, and prints the error stream after "ERROR ".
package main

import (
	"bufio"
	"fmt"
	"io"
	"io/ioutil"
	"net"
	"net/http"
	"net/url"
	"os"
	"strings"
	"sync"
	"time"

	"github.com/docker/spdystream"
	"github.com/gorilla/websocket"
)

// wsConn is a WebSocket as a byte stream: each binary message carries the next bytes.
type wsConn struct {
	*websocket.Conn
	r io.Reader
}

func (c *wsConn) Read(p []byte) (int, error) {
	for {
		if c.r != nil {
			n, err := c.r.Read(p)
			if err == io.EOF {
				c.r = nil
				if n > 0 {
					return n, nil
				}
				continue
			}
			return n, err
		}
		t, r, err := c.NextReader()
		if err != nil {
			return 0, io.EOF
		}
		if t == websocket.BinaryMessage {
			c.r = r
		}
	}
}

func (c *wsConn) Write(p []byte) (int, error) {
	if err := c.WriteMessage(websocket.BinaryMessage, p); err != nil {
		return 0, err
	}
	return len(p), nil
}

func (c *wsConn) SetDeadline(t time.Time) error {
	c.SetReadDeadline(t)
	return c.SetWriteDeadline(t)
}

// upgradeWS opens a WebSocket with the SPDY port-forward subprotocol and serves SPDY inside it.
func upgradeWS(raw string) *spdystream.Connection {
	d := websocket.Dialer{Subprotocols: []string{"SPDY/3.1+portforward.k8s.io"}}
	ws, resp, err := d.Dial(strings.Replace(raw, "http://", "ws://", 1), nil)
	if err != nil {
		if resp != nil {
			body, _ := ioutil.ReadAll(resp.Body)
			fmt.Fprintf(os.Stderr, "HTTP %d %s", resp.StatusCode, body)
			os.Exit(3)
		}
		fail("%v", err)
	}
	if ws.Subprotocol() != "SPDY/3.1+portforward.k8s.io" {
		fail("the server chose %q", ws.Subprotocol())
	}
	s, err := spdystream.NewConnection(&wsConn{Conn: ws}, false)
	if err != nil {
		fail("%v", err)
	}
	go s.Serve(spdystream.NoOpStreamHandler)
	return s
}

func fail(format string, a ...interface{}) {
	fmt.Fprintf(os.Stderr, "spdy-client: "+format+"\n", a...)
	os.Exit(2)
}

// upgrade opens the connection and asks for SPDY/3.1 with these stream protocols.
func upgrade(raw string, protocols []string) (*spdystream.Connection, string) {
	u, err := url.Parse(raw)
	if err != nil {
		fail("%v", err)
	}
	conn, err := net.Dial("tcp", u.Host)
	if err != nil {
		fail("%v", err)
	}
	req, _ := http.NewRequest("POST", raw, nil)
	req.Header.Set("Connection", "Upgrade")
	req.Header.Set("Upgrade", "SPDY/3.1")
	for _, p := range protocols {
		req.Header.Add("X-Stream-Protocol-Version", p)
	}
	if err := req.Write(conn); err != nil {
		fail("%v", err)
	}
	resp, err := http.ReadResponse(bufio.NewReader(conn), req)
	if err != nil {
		fail("%v", err)
	}
	if resp.StatusCode != http.StatusSwitchingProtocols {
		body, _ := ioutil.ReadAll(resp.Body)
		fmt.Fprintf(os.Stderr, "HTTP %d %s", resp.StatusCode, body)
		os.Exit(3)
	}
	s, err := spdystream.NewConnection(conn, false)
	if err != nil {
		fail("%v", err)
	}
	go s.Serve(spdystream.NoOpStreamHandler)
	return s, resp.Header.Get("X-Stream-Protocol-Version")
}

func stream(c *spdystream.Connection, h http.Header) *spdystream.Stream {
	s, err := c.CreateStream(h, nil, false)
	if err != nil {
		fail("creating a stream: %v", err)
	}
	if err := s.Wait(); err != nil {
		fail("waiting for the reply: %v", err)
	}
	return s
}

func exec(raw string, args []string) {
	stdin, tty, stdout, stderr, resize := false, false, true, false, ""
	for i := 0; i < len(args); i++ {
		switch args[i] {
		case "-stdin":
			stdin = true
		case "-tty":
			tty = true
		case "-no-stdout":
			stdout = false
		case "-stderr":
			stderr = true
		case "-resize":
			i++
			resize = args[i]
		default:
			fail("unknown flag %s", args[i])
		}
	}
	c, proto := upgrade(raw, []string{"v4.channel.k8s.io", "v3.channel.k8s.io", "v2.channel.k8s.io"})
	fmt.Fprintf(os.Stderr, "PROTOCOL %s\n", proto)
	errStream := stream(c, http.Header{"streamType": {"error"}})
	var wg sync.WaitGroup
	if stdin {
		in := stream(c, http.Header{"streamType": {"stdin"}})
		go func() {
			io.Copy(in, os.Stdin)
			in.Close()
		}()
	}
	copyOut := func(kind string, w io.Writer) {
		s := stream(c, http.Header{"streamType": {kind}})
		wg.Add(1)
		go func() {
			defer wg.Done()
			io.Copy(w, s)
		}()
	}
	if stdout {
		copyOut("stdout", os.Stdout)
	}
	if stderr {
		copyOut("stderr", os.Stderr)
	}
	if tty {
		r := stream(c, http.Header{"streamType": {"resize"}})
		if resize != "" {
			var w, h int
			fmt.Sscanf(resize, "%dx%d", &w, &h)
			fmt.Fprintf(r, `{"Width":%d,"Height":%d}`, w, h)
		}
	}
	status, _ := ioutil.ReadAll(errStream)
	wg.Wait()
	fmt.Fprintf(os.Stderr, "STATUS %s\n", strings.TrimSpace(string(status)))
	c.Close()
}

func portForward(raw string, port string, id string, overWS bool) {
	var c *spdystream.Connection
	if overWS {
		c = upgradeWS(raw)
	} else {
		var proto string
		c, proto = upgrade(raw, []string{"portforward.k8s.io"})
		if proto != "portforward.k8s.io" {
			fail("the server chose %q", proto)
		}
	}
	errStream := stream(c, http.Header{"streamType": {"error"}, "port": {port}, "requestID": {id}})
	data := stream(c, http.Header{"streamType": {"data"}, "port": {port}, "requestID": {id}})
	go func() {
		io.Copy(data, os.Stdin)
		data.Close()
	}()
	done := make(chan struct{})
	go func() {
		io.Copy(os.Stdout, data)
		close(done)
	}()
	msg, _ := ioutil.ReadAll(errStream)
	<-done
	if len(msg) > 0 {
		fmt.Fprintf(os.Stderr, "ERROR %s\n", msg)
		os.Exit(1)
	}
	c.Close()
}

func main() {
	if len(os.Args) < 3 {
		fail("usage: spdy-client exec URL [flags] | portforward URL PORT [REQUEST_ID]")
	}
	switch os.Args[1] {
	case "exec":
		exec(os.Args[2], os.Args[3:])
	case "portforward", "portforward-ws":
		if len(os.Args) < 4 {
			fail("portforward URL PORT")
		}
		id := "0"
		if len(os.Args) > 4 {
			id = os.Args[4]
		}
		portForward(os.Args[2], os.Args[3], id, os.Args[1] == "portforward-ws")
	default:
		fail("unknown command %s", os.Args[1])
	}
}
