#!/usr/bin/env python3
"""Opens secrets sealed by sidenet with libsodium's primitives (PyNaCl bindings), from the
construction described in wire/src/seal.rs alone:

  recipient X25519 secret = crypto_sign_ed25519_sk_to_curve25519(node ed25519 secret key)
  shared = X25519(secret, E), E = first 32 bytes of the sealed value
  key    = SHA-256("sidenet-seal-v1" || shared || E || recipient X25519 public key)
  plaintext = ChaCha20-Poly1305-IETF-decrypt(rest, aad, nonce = 12 zero bytes, key)
  aad    = "sidenet-seal-v1" 0 mesh 0 node 0 name

Usage: open_sealed.py FILE  where FILE is JSON: {"seed": base64 32-byte node seed,
"cases": [{"mesh", "node", "name", "sealed"}, ...]}. Prints a JSON list: the opened text, or
"refused".
"""
import base64
import hashlib
import json
import sys

import nacl.bindings as b
import nacl.exceptions
import nacl.signing


def open_one(seed: bytes, mesh: str, node: str, name: str, sealed: str) -> str:
    sk = nacl.signing.SigningKey(seed)
    sk64 = seed + bytes(sk.verify_key)
    x_secret = b.crypto_sign_ed25519_sk_to_curve25519(sk64)
    x_public = b.crypto_sign_ed25519_pk_to_curve25519(bytes(sk.verify_key))
    raw = base64.b64decode(sealed)
    eph, ct = raw[:32], raw[32:]
    shared = b.crypto_scalarmult(x_secret, eph)
    key = hashlib.sha256(b"sidenet-seal-v1" + shared + eph + x_public).digest()
    aad = b"sidenet-seal-v1" + b"".join(b"\0" + p.encode() for p in (mesh, node, name))
    try:
        pt = b.crypto_aead_chacha20poly1305_ietf_decrypt(ct, aad, bytes(12), key)
    except nacl.exceptions.CryptoError:
        return "refused"
    return pt.decode()


def main() -> None:
    doc = json.load(open(sys.argv[1]))
    seed = base64.b64decode(doc["seed"])
    print(json.dumps([open_one(seed, c["mesh"], c["node"], c["name"], c["sealed"]) for c in doc["cases"]]))


if __name__ == "__main__":
    main()
