#!/usr/bin/env python3
"""Checks sidenet envelopes with an independent ed25519 implementation (PyNaCl / libsodium).

Usage: verify_nacl.py FILE   where FILE is JSON: {"public_key": base64, "envelopes": [hex, ...]}
Prints one JSON list: for each envelope, "ok" or the reason it failed. The framing is read from
docs/design.md, not from the Rust code: magic "SNET", version, kind, header length (u16 BE),
signer key (32), signature (64), header, body; the signature covers bytes 0..40 + header, and the
header's sha256/len pin the body.
"""
import base64
import hashlib
import json
import struct
import sys

import nacl.exceptions
import nacl.signing


def check(pk: bytes, env: bytes) -> str:
    if len(env) < 104 or env[:4] != b"SNET":
        return "framing"
    (hlen,) = struct.unpack(">H", env[6:8])
    if env[8:40] != pk:
        return "signer"
    sig = env[40:104]
    header = env[104:104 + hlen]
    body = env[104 + hlen:]
    try:
        nacl.signing.VerifyKey(pk).verify(env[:40] + header, sig)
    except nacl.exceptions.BadSignatureError:
        return "signature"
    h = json.loads(header)
    if h["len"] != len(body) or hashlib.sha256(body).hexdigest() != h["sha256"]:
        return "body"
    return "ok"


def main() -> None:
    with open(sys.argv[1]) as f:
        doc = json.load(f)
    pk = base64.b64decode(doc["public_key"])
    print(json.dumps([check(pk, bytes.fromhex(e)) for e in doc["envelopes"]]))


if __name__ == "__main__":
    main()
