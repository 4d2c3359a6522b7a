#!/usr/bin/env python3
"""Parse one node's rendered OpenWrt configuration with OpenWISP's netjsonconfig.

Usage: python3 check_openwrt.py DIR

DIR holds etc/config/{network,wireless,firewall,babeld} as rendered for one node
(babeld may be missing). The files are joined into the text `uci export` prints
(a `package NAME` line before each file; comments dropped, as uci export drops
them) and parsed with `netjsonconfig.OpenWrt(native=text)`, which converts to
NetJSON and validates it against the OpenWrt schema (strict).

netjsonconfig has no schema for babeld and accepts it as a generic package. Should
strict validation ever fail because of babeld alone, the other packages are
validated strictly and babeld is read with the non-validating parser
(`OpenWrtParser(text).intermediate_data`); "unvalidated" then lists it.

On success prints ONE JSON object to stdout and exits 0:
  interfaces   NetJSON interface names (devices: lo, br-lan, mesh0, ...)
  networks     logical interface names of /etc/config/network (loopback, lan, sidenet, ...)
  mesh_iface   ifname of the 802.11s interface
  mesh_network networks the 802.11s interface is attached to
  mesh_id      its mesh ID
  radio        the wifi-device it uses
  channel      that radio's channel
  encryption   NetJSON encryption protocol of the mesh ("wpa3_personal" for 'sae+ccmp')
  cipher       NetJSON cipher of the mesh ("ccmp")
  ieee80211w   management frame protection of the mesh ("2" = required)
  addresses    static addresses as "ADDRESS/PREFIXLEN"
  radios       [{name, band, channel, channel_width, protocol, country, tx_power}]
  zones        firewall zone names
  unvalidated  packages that were parsed but not schema-validated ([] normally)
The mesh passphrase is never printed.
On failure prints the error to stderr and exits 1 (2 for a usage error).
"""

import contextlib
import json
import os
import sys

PACKAGES = ("network", "wireless", "firewall", "babeld")
OPTIONAL = ("babeld",)


def fail(message):
    print(f"check_openwrt: {message}", file=sys.stderr)
    sys.exit(1)


def redact(message, files):
    """Blank out wifi keys: netjsonconfig's errors quote whole interfaces."""
    from netjsonconfig.backends.openwrt.parser import OpenWrtParser

    try:
        blocks = OpenWrtParser(uci_export_text({"wireless": files["wireless"]})).intermediate_data.get("wireless", [])
    except Exception:  # an unparsable file has no keys we can find
        return message
    for block in blocks:
        for option, value in block.items():
            if (option == "key" or option.startswith("key") or option.endswith("_secret")) and isinstance(value, str) and value:
                message = message.replace(value, "<redacted>")
    return message


def uci_export_text(files):
    """Join {package: file text} into `uci export` form."""
    chunks = []
    for package, content in files.items():
        lines = [line.rstrip() for line in content.splitlines()]
        kept = []
        for line in lines:
            if line.lstrip().startswith("#"):
                continue
            if not line and (not kept or not kept[-1]):
                continue
            kept.append(line)
        body = "\n".join(kept).strip("\n")
        chunks.append(f"package {package}\n\n{body}\n")
    return "\n".join(chunks)


def parse_strict(files):
    from netjsonconfig import OpenWrt

    # netjsonconfig may print warnings; keep stdout for the one JSON object.
    with contextlib.redirect_stdout(sys.stderr):
        return OpenWrt(native=uci_export_text(files)).config


def parse_loose(files):
    from netjsonconfig.backends.openwrt.parser import OpenWrtParser

    with contextlib.redirect_stdout(sys.stderr):
        return OpenWrtParser(uci_export_text(files)).intermediate_data


def load(directory):
    files = {}
    for package in PACKAGES:
        path = os.path.join(directory, "etc", "config", package)
        if not os.path.isfile(path):
            if package in OPTIONAL:
                continue
            fail(f"missing {path}")
        with open(path, encoding="utf-8") as handle:
            files[package] = handle.read()
    return files


def parse(files):
    """Return (netjson, unvalidated packages)."""
    from netjsonconfig.exceptions import ValidationError

    try:
        return parse_strict(files), []
    except ValidationError as error:
        if "babeld" not in files:
            raise
        first_error = error
    rest = {name: text for name, text in files.items() if name != "babeld"}
    try:
        config = parse_strict(rest)
    except ValidationError:
        raise first_error from None
    config["babeld"] = parse_loose({"babeld": files["babeld"]}).get("babeld", [])
    return config, ["babeld"]


def logical_networks(files):
    blocks = parse_loose({"network": files["network"]}).get("network", [])
    # The parser turns `config device` blocks into interfaces too; only real
    # interface sections have a proto.
    return [block[".name"] for block in blocks if block.get(".type") == "interface" and "proto" in block]


def summarise(config, files, unvalidated):
    interfaces = config.get("interfaces", [])
    radios = config.get("radios", [])
    meshes = [i for i in interfaces if i.get("type") == "wireless" and i.get("wireless", {}).get("mode") == "802.11s"]
    if not meshes:
        fail("no 802.11s (mode 'mesh') wifi-iface found")
    mesh = meshes[0]
    wireless = mesh["wireless"]
    radio = next((r for r in radios if r.get("name") == wireless.get("radio")), None)
    if radio is None:
        fail(f"mesh interface {mesh['name']} uses unknown radio {wireless.get('radio')!r}")
    encryption = wireless.get("encryption", {"protocol": "none"})

    addresses = []
    for interface in interfaces:
        for address in interface.get("addresses", []):
            if address.get("proto") == "static" and "address" in address:
                addresses.append(f"{address['address']}/{address['mask']}")

    zones = [block.get("name") for block in config.get("firewall", []) if block.get("config_name") == "zone"]

    return {
        "interfaces": [i["name"] for i in interfaces],
        "networks": logical_networks(files),
        "mesh_iface": mesh["name"],
        "mesh_network": wireless.get("network", []),
        "mesh_id": wireless.get("mesh_id"),
        "radio": radio["name"],
        "channel": radio.get("channel"),
        "encryption": encryption.get("protocol"),
        "cipher": encryption.get("cipher"),
        "ieee80211w": encryption.get("ieee80211w"),
        "addresses": addresses,
        "radios": [
            {
                "name": r.get("name"),
                "band": r.get("band"),
                "channel": r.get("channel"),
                "channel_width": r.get("channel_width"),
                "protocol": r.get("protocol"),
                "country": r.get("country"),
                "tx_power": r.get("tx_power"),
            }
            for r in radios
        ],
        "zones": zones,
        "unvalidated": unvalidated,
    }


def main(argv):
    if len(argv) != 2 or argv[1] in ("-h", "--help"):
        print(__doc__.strip().splitlines()[2], file=sys.stderr)
        return 2
    files = load(argv[1])
    try:
        config, unvalidated = parse(files)
    except ImportError as error:
        fail(f"netjsonconfig is not installed ({error}); pip install -r requirements.txt")
    except Exception as error:  # netjsonconfig raises several kinds; report any.
        fail(f"netjsonconfig rejected the configuration: {type(error).__name__}: {redact(str(error), files)}")
    print(json.dumps(summarise(config, files, unvalidated), sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
