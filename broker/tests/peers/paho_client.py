"""An agent-like paho-mqtt client for the broker tests.

Usage: paho_client.py PORT CLIENT_ID. Connects (MQTT 3.1.1) with a retained will
"offline" on p/CLIENT_ID/online, publishes "online" there (retained, QoS 1), subscribes to
p/config/# at QoS 1, prints one JSON line per message received ({"topic", "payload",
"retain", "qos"}) until it has seen "p/config/end", then exits without DISCONNECT so the
broker publishes the will.
"""

import json
import os
import sys
import threading

import paho.mqtt.client as mqtt

port, client_id = int(sys.argv[1]), sys.argv[2]
done = threading.Event()


def on_connect(client, userdata, flags, reason_code, properties):
    if reason_code != 0:
        print(json.dumps({"refused": str(reason_code)}), flush=True)
        os._exit(3)
    client.publish(f"p/{client_id}/online", b"online", qos=1, retain=True)
    client.subscribe("p/config/#", qos=1)


def on_message(client, userdata, msg):
    print(json.dumps({"topic": msg.topic, "payload": msg.payload.decode(),
                      "retain": bool(msg.retain), "qos": msg.qos}), flush=True)
    if msg.topic == "p/config/end":
        done.set()


c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id,
                protocol=mqtt.MQTTv311, clean_session=True)
c.will_set(f"p/{client_id}/online", b"offline", qos=1, retain=True)
c.on_connect = on_connect
c.on_message = on_message
c.connect("127.0.0.1", port, keepalive=30)
c.loop_start()
if not done.wait(20):
    os._exit(2)
os._exit(0)  # no DISCONNECT: the socket just closes
