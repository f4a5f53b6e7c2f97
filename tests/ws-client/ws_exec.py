#!/usr/bin/python3
"""ws_exec: the client side of Kubernetes' WebSocket exec protocol (v5.channel.k8s.io, also
v4), on Debian's python3-websocket (websocket-client). The tests drive the agent's CRI streaming
server with it, an implementation that is not the server's own.

    ws_exec.py URL [--protocol P] [--stdin] [--resize WxH]

Each binary message is one channel's data after a byte naming the channel: 0 stdin, 1 stdout,
2 stderr, 3 error, 4 resize; in v5, the message 255, 0 closes stdin. stdin is copied to channel
0 and then closed; channels 1 and 2 go to stdout and stderr; the error channel is printed on
stderr after "STATUS ", the protocol the server chose after "PROTOCOL ".
"""
import argparse
import sys

import websocket


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("url")
    ap.add_argument("--protocol", action="append")
    ap.add_argument("--stdin", action="store_true")
    ap.add_argument("--resize")
    a = ap.parse_args()
    protocols = a.protocol or ["v5.channel.k8s.io", "v4.channel.k8s.io"]
    url = a.url.replace("http://", "ws://", 1)
    try:
        ws = websocket.create_connection(url, subprotocols=protocols, timeout=60)
    except websocket.WebSocketBadStatusException as e:
        sys.stderr.write("HTTP %d %s\n" % (e.status_code, e))
        sys.exit(3)
    chosen = ws.getsubprotocol()
    sys.stderr.write("PROTOCOL %s\n" % chosen)
    sys.stderr.flush()
    if a.resize:
        w, h = a.resize.split("x")
        ws.send_binary(bytes([4]) + ('{"Width":%s,"Height":%s}' % (w, h)).encode())
    if a.stdin:
        data = sys.stdin.buffer.read()
        if data:
            ws.send_binary(bytes([0]) + data)
        if chosen == "v5.channel.k8s.io":
            ws.send_binary(bytes([255, 0]))
    status = b""
    while True:
        try:
            op, data = ws.recv_data()
        except websocket.WebSocketConnectionClosedException:
            break
        if op == websocket.ABNF.OPCODE_CLOSE:
            break
        if not data:
            continue
        ch, rest = data[0], data[1:]
        if ch == 1:
            sys.stdout.buffer.write(rest)
            sys.stdout.flush()
        elif ch == 2:
            sys.stderr.buffer.write(rest)
            sys.stderr.flush()
        elif ch == 3:
            status += rest
    sys.stderr.write("STATUS %s\n" % status.decode(errors="replace").strip())


if __name__ == "__main__":
    main()
