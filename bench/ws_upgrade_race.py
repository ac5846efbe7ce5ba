#!/usr/bin/env python3
"""Open CONNS x ROUNDS WebSockets to HOST:PORT PATH (raw sockets, no library),
read the first message, echo three, and count the connections that end early
(EOF after the 101). Shows Pingora issue #946 (an upgrade torn down when the
upstream's 101 is read before the request's empty body) through a sessionlb
node, against 0 failures directly to the demo backend:

    python3 bench/ws_upgrade_race.py 127.0.0.9 18792 /ws 50 20 [COOKIE]
"""
import socket, base64, os, threading, sys, time, struct
host, port, path, conns, rounds = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
cookie = sys.argv[6] if len(sys.argv) > 6 else None
fails = []; ok = [0]; lock = threading.Lock()
def recv_frame(s):
    h = b''
    while len(h) < 2:
        c = s.recv(2 - len(h))
        if not c: raise EOFError("eof in header")
        h += c
    n = h[1] & 0x7f
    if n == 126: n = struct.unpack(">H", s.recv(2))[0]
    data = b''
    while len(data) < n:
        c = s.recv(n - len(data))
        if not c: raise EOFError("eof in body")
        data += c
    return h[0] & 0x0f, data
def send_frame(s, payload):
    mask = os.urandom(4)
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    s.sendall(bytes([0x81, 0x80 | len(payload)]) + mask + masked)
def worker(i):
    for r in range(rounds):
        try:
            stage='connect'
            s = socket.create_connection((host, port), timeout=5)
            key = base64.b64encode(os.urandom(16)).decode()
            s.sendall((f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n" + (f"Cookie: {cookie}\r\n" if cookie else "") + "\r\n").encode())
            resp = b''
            while b'\r\n\r\n' not in resp:
                c = s.recv(1)
                if not c: raise EOFError("eof in handshake")
                resp += c
            if b' 101 ' not in resp.split(b'\r\n')[0]: raise Exception("status " + resp.split(b'\r\n')[0].decode())
            stage='hello'
            op, hello = recv_frame(s)
            stage='echo'
            for k in range(3):
                msg = f"m{i}-{r}-{k}".encode()
                send_frame(s, msg)
                op, data = recv_frame(s)
                if data != msg: raise Exception(f"echo {data!r}")
            s.close()
            with lock: ok[0] += 1
        except Exception as e:
            with lock: fails.append(f"{i}/{r} {stage}: {type(e).__name__} {e}")
ts = [threading.Thread(target=worker, args=(i,)) for i in range(conns)]
t0 = time.time()
for t in ts: t.start()
for t in ts: t.join()
print(f"{ok[0]} ok, {len(fails)} failed in {time.time()-t0:.1f}s", fails[:5])
