#!/usr/bin/env python3
"""dkimpy (an independent DKIM/ARC implementation) as a command for the Rust tests.

    dkimpy_tool.py keygen KEYFILE                        -> prints the TXT record value
    dkimpy_tool.py sign SELECTOR DOMAIN KEYFILE < msg    -> DKIM-Signature + msg
    dkimpy_tool.py arc SELECTOR DOMAIN KEYFILE SRV_ID < msg -> ARC set + msg

keygen makes an RSA-2048 key with openssl (PKCS#1, which dkimpy reads) and prints
"v=DKIM1; k=rsa; p=..." for the test DNS server.
"""

import base64
import subprocess
import sys

import dkim

HEADERS = [b"from", b"to", b"subject", b"date", b"message-id"]


def keygen(keyfile):
    subprocess.run(
        ["openssl", "genrsa", "-traditional", "-out", keyfile, "2048"],
        check=True,
        capture_output=True,
    )
    der = subprocess.run(
        ["openssl", "rsa", "-in", keyfile, "-pubout", "-outform", "DER"],
        check=True,
        capture_output=True,
    ).stdout
    print("v=DKIM1; k=rsa; p=" + base64.b64encode(der).decode())


def main(argv):
    mode = argv[1]
    if mode == "keygen":
        keygen(argv[2])
        return
    selector, domain, keyfile = (a.encode() for a in argv[2:5])
    key = open(keyfile, "rb").read()
    msg = sys.stdin.buffer.read()
    if mode == "sign":
        out = dkim.sign(msg, selector, domain, key, include_headers=HEADERS, linesep=b"\r\n") + msg
    elif mode == "arc":
        srv_id = argv[5].encode()
        out = b"".join(dkim.arc_sign(msg, selector, domain, key, srv_id, include_headers=HEADERS, linesep=b"\r\n")) + msg
    else:
        sys.exit(f"unknown mode {mode}")
    sys.stdout.buffer.write(out)


if __name__ == "__main__":
    main(sys.argv)
