//! MQTT 3.1.1 packets as a server sees them: decoding what clients send, encoding what the
//! server sends back.
//!
//! [`decode`] works on a growing read buffer and returns `Ok(None)` until a whole packet is
//! there, so partial reads are handled by calling it again after the next read. The packet size
//! limit is checked as soon as the fixed header is complete, before the body is buffered.

use bytes::{Buf, BufMut, Bytes, BytesMut};

/// Largest remaining length MQTT can encode (four length bytes).
pub const MAX_REMAINING: usize = 268_435_455;

/// A packet that cannot be accepted; the connection is closed after it.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CodecError {
    /// The packet is larger than the configured limit.
    #[error("packet of {size} bytes exceeds the limit of {limit}")]
    TooLarge {
        /// Whole packet size announced by the fixed header.
        size: usize,
        /// Configured limit.
        limit: usize,
    },
    /// The remaining-length field uses more than four bytes.
    #[error("malformed remaining length")]
    BadLength,
    /// The packet does not follow MQTT 3.1.1.
    #[error("malformed {packet}: {what}")]
    Malformed {
        /// Packet type.
        packet: &'static str,
        /// What is wrong.
        what: &'static str,
    },
    /// A packet type only a server sends (CONNACK, SUBACK, ...) or a reserved one.
    #[error("packet type {0} is not accepted from a client")]
    Unexpected(u8),
}

/// The will a client leaves with its CONNECT.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Will {
    /// Topic the will is published to.
    pub topic: String,
    /// Payload.
    pub payload: Bytes,
    /// QoS (0, 1 or 2).
    pub qos: u8,
    /// Published retained.
    pub retain: bool,
}

/// CONNECT of MQTT 3.1.1 (protocol name "MQTT", level 4).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Connect {
    /// Clean-session flag.
    pub clean_session: bool,
    /// Keepalive in seconds (0 = none).
    pub keep_alive: u16,
    /// Client identifier.
    pub client_id: String,
    /// Last will, if any.
    pub will: Option<Will>,
    /// User name, if any.
    pub username: Option<String>,
    /// Password, if any.
    pub password: Option<Bytes>,
}

/// PUBLISH.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Publish {
    /// Duplicate-delivery flag.
    pub dup: bool,
    /// QoS (0, 1 or 2).
    pub qos: u8,
    /// Retain flag.
    pub retain: bool,
    /// Topic name (not yet validated for wildcards).
    pub topic: String,
    /// Packet identifier (0 for QoS 0).
    pub pkid: u16,
    /// Payload.
    pub payload: Bytes,
}

/// A packet received from a client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Packet {
    /// CONNECT of MQTT 3.1.1.
    Connect(Connect),
    /// CONNECT of another protocol level (3 = MQTT 3.1, 5 = MQTT 5, ...): answered with
    /// CONNACK 1 (unacceptable protocol version).
    UnsupportedProtocol(u8),
    /// PUBLISH.
    Publish(Publish),
    /// PUBACK (packet id).
    PubAck(u16),
    /// PUBREC (packet id).
    PubRec(u16),
    /// PUBREL (packet id).
    PubRel(u16),
    /// PUBCOMP (packet id).
    PubComp(u16),
    /// SUBSCRIBE: packet id and (filter, requested QoS) pairs.
    Subscribe(u16, Vec<(String, u8)>),
    /// UNSUBSCRIBE: packet id and filters.
    Unsubscribe(u16, Vec<String>),
    /// PINGREQ.
    PingReq,
    /// DISCONNECT.
    Disconnect,
}

/// Decodes one packet from the front of `buf`. `Ok(None)`: more bytes are needed (the buffer is
/// reserved for the rest of the packet).
pub fn decode(buf: &mut BytesMut, max_packet: usize) -> Result<Option<Packet>, CodecError> {
    if buf.len() < 2 {
        return Ok(None);
    }
    let mut remaining: usize = 0;
    let mut header_len = 1;
    let mut shift = 0;
    loop {
        let Some(&b) = buf.get(header_len) else {
            return Ok(None);
        };
        header_len += 1;
        remaining += usize::from(b & 0x7f) << shift;
        if b & 0x80 == 0 {
            break;
        }
        shift += 7;
        if header_len == 5 {
            return Err(CodecError::BadLength);
        }
    }
    let size = header_len + remaining;
    if size > max_packet {
        return Err(CodecError::TooLarge {
            size,
            limit: max_packet,
        });
    }
    if buf.len() < size {
        buf.reserve(size - buf.len());
        return Ok(None);
    }
    let first = buf[0];
    let mut frame = buf.split_to(size).freeze();
    frame.advance(header_len);
    parse(first, frame).map(Some)
}

fn malformed(packet: &'static str, what: &'static str) -> CodecError {
    CodecError::Malformed { packet, what }
}

fn parse(first: u8, mut body: Bytes) -> Result<Packet, CodecError> {
    let kind = first >> 4;
    let flags = first & 0x0f;
    let fixed_flags = |name: &'static str, want: u8| {
        if flags == want {
            Ok(())
        } else {
            Err(malformed(name, "reserved flags"))
        }
    };
    match kind {
        1 => {
            fixed_flags("CONNECT", 0)?;
            parse_connect(&mut body)
        }
        3 => parse_publish(flags, body),
        4..=7 => {
            let name = ["PUBACK", "PUBREC", "PUBREL", "PUBCOMP"][usize::from(kind - 4)];
            fixed_flags(name, if kind == 6 { 2 } else { 0 })?;
            if body.len() != 2 {
                return Err(malformed(name, "length"));
            }
            let id = body.get_u16();
            Ok(match kind {
                4 => Packet::PubAck(id),
                5 => Packet::PubRec(id),
                6 => Packet::PubRel(id),
                _ => Packet::PubComp(id),
            })
        }
        8 => {
            fixed_flags("SUBSCRIBE", 2)?;
            let pkid = read_u16(&mut body, "SUBSCRIBE")?;
            let mut filters = Vec::new();
            while body.has_remaining() {
                let f = read_string(&mut body, "SUBSCRIBE")?;
                if !body.has_remaining() {
                    return Err(malformed("SUBSCRIBE", "missing QoS"));
                }
                let qos = body.get_u8();
                if qos > 2 {
                    return Err(malformed("SUBSCRIBE", "requested QoS"));
                }
                filters.push((f, qos));
            }
            if filters.is_empty() {
                return Err(malformed("SUBSCRIBE", "no topic filter"));
            }
            Ok(Packet::Subscribe(pkid, filters))
        }
        10 => {
            fixed_flags("UNSUBSCRIBE", 2)?;
            let pkid = read_u16(&mut body, "UNSUBSCRIBE")?;
            let mut filters = Vec::new();
            while body.has_remaining() {
                filters.push(read_string(&mut body, "UNSUBSCRIBE")?);
            }
            if filters.is_empty() {
                return Err(malformed("UNSUBSCRIBE", "no topic filter"));
            }
            Ok(Packet::Unsubscribe(pkid, filters))
        }
        12 => {
            fixed_flags("PINGREQ", 0)?;
            if body.has_remaining() {
                return Err(malformed("PINGREQ", "length"));
            }
            Ok(Packet::PingReq)
        }
        14 => {
            fixed_flags("DISCONNECT", 0)?;
            if body.has_remaining() {
                return Err(malformed("DISCONNECT", "length"));
            }
            Ok(Packet::Disconnect)
        }
        other => Err(CodecError::Unexpected(other)),
    }
}

fn parse_connect(body: &mut Bytes) -> Result<Packet, CodecError> {
    const P: &str = "CONNECT";
    let name = read_string(body, P)?;
    if !body.has_remaining() {
        return Err(malformed(P, "missing protocol level"));
    }
    let level = body.get_u8();
    match (name.as_str(), level) {
        ("MQTT", 4) => {}
        ("MQTT", _) | ("MQIsdp", _) => return Ok(Packet::UnsupportedProtocol(level)),
        _ => return Err(malformed(P, "protocol name")),
    }
    if body.remaining() < 3 {
        return Err(malformed(P, "length"));
    }
    let flags = body.get_u8();
    let keep_alive = body.get_u16();
    if flags & 0x01 != 0 {
        return Err(malformed(P, "reserved flag"));
    }
    let clean_session = flags & 0x02 != 0;
    let will_flag = flags & 0x04 != 0;
    let will_qos = (flags >> 3) & 0x03;
    let will_retain = flags & 0x20 != 0;
    let has_password = flags & 0x40 != 0;
    let has_username = flags & 0x80 != 0;
    if will_qos > 2 {
        return Err(malformed(P, "will QoS"));
    }
    if !will_flag && (will_qos != 0 || will_retain) {
        return Err(malformed(P, "will flags without a will"));
    }
    if has_password && !has_username {
        return Err(malformed(P, "password without user name"));
    }
    let client_id = read_string(body, P)?;
    let will = if will_flag {
        let topic = read_string(body, P)?;
        let payload = read_binary(body, P)?;
        Some(Will {
            topic,
            payload,
            qos: will_qos,
            retain: will_retain,
        })
    } else {
        None
    };
    let username = if has_username {
        Some(read_string(body, P)?)
    } else {
        None
    };
    let password = if has_password {
        Some(read_binary(body, P)?)
    } else {
        None
    };
    if body.has_remaining() {
        return Err(malformed(P, "trailing bytes"));
    }
    Ok(Packet::Connect(Connect {
        clean_session,
        keep_alive,
        client_id,
        will,
        username,
        password,
    }))
}

fn parse_publish(flags: u8, mut body: Bytes) -> Result<Packet, CodecError> {
    const P: &str = "PUBLISH";
    let dup = flags & 0x08 != 0;
    let qos = (flags >> 1) & 0x03;
    let retain = flags & 0x01 != 0;
    if qos == 3 {
        return Err(malformed(P, "QoS 3"));
    }
    if qos == 0 && dup {
        return Err(malformed(P, "DUP on QoS 0"));
    }
    let topic = read_string(&mut body, P)?;
    let pkid = if qos > 0 {
        let id = read_u16(&mut body, P)?;
        if id == 0 {
            return Err(malformed(P, "packet identifier 0"));
        }
        id
    } else {
        0
    };
    Ok(Packet::Publish(Publish {
        dup,
        qos,
        retain,
        topic,
        pkid,
        payload: body,
    }))
}

fn read_u16(body: &mut Bytes, packet: &'static str) -> Result<u16, CodecError> {
    if body.remaining() < 2 {
        return Err(malformed(packet, "truncated"));
    }
    Ok(body.get_u16())
}

fn read_binary(body: &mut Bytes, packet: &'static str) -> Result<Bytes, CodecError> {
    let len = usize::from(read_u16(body, packet)?);
    if body.remaining() < len {
        return Err(malformed(packet, "truncated"));
    }
    Ok(body.split_to(len))
}

fn read_string(body: &mut Bytes, packet: &'static str) -> Result<String, CodecError> {
    let raw = read_binary(body, packet)?;
    String::from_utf8(raw.to_vec()).map_err(|_| malformed(packet, "string is not UTF-8"))
}

fn put_remaining(out: &mut BytesMut, mut len: usize) {
    loop {
        let mut b = (len % 128) as u8;
        len /= 128;
        if len > 0 {
            b |= 0x80;
        }
        out.put_u8(b);
        if len == 0 {
            break;
        }
    }
}

/// CONNACK with a return code (0 accepted, 1 protocol version, 2 identifier rejected, 3 server
/// unavailable, 4 bad user name or password, 5 not authorized).
pub fn connack(out: &mut BytesMut, session_present: bool, code: u8) {
    out.put_slice(&[0x20, 2, u8::from(session_present), code]);
}

/// PUBLISH. `pkid` is ignored for QoS 0. Fails only if the packet is too large for MQTT.
pub fn publish(
    out: &mut BytesMut,
    topic: &str,
    payload: &[u8],
    qos: u8,
    retain: bool,
    pkid: u16,
) -> Result<(), CodecError> {
    let topic_len = u16::try_from(topic.len()).map_err(|_| malformed("PUBLISH", "topic length"))?;
    let remaining = 2 + topic.len() + if qos > 0 { 2 } else { 0 } + payload.len();
    if remaining > MAX_REMAINING {
        return Err(CodecError::TooLarge {
            size: remaining,
            limit: MAX_REMAINING,
        });
    }
    out.reserve(5 + remaining);
    out.put_u8(0x30 | (qos << 1) | u8::from(retain));
    put_remaining(out, remaining);
    out.put_u16(topic_len);
    out.put_slice(topic.as_bytes());
    if qos > 0 {
        out.put_u16(pkid);
    }
    out.put_slice(payload);
    Ok(())
}

/// PUBACK.
pub fn puback(out: &mut BytesMut, pkid: u16) {
    out.put_u8(0x40);
    out.put_u8(2);
    out.put_u16(pkid);
}

/// PUBREC.
pub fn pubrec(out: &mut BytesMut, pkid: u16) {
    out.put_u8(0x50);
    out.put_u8(2);
    out.put_u16(pkid);
}

/// PUBCOMP.
pub fn pubcomp(out: &mut BytesMut, pkid: u16) {
    out.put_u8(0x70);
    out.put_u8(2);
    out.put_u16(pkid);
}

/// SUBACK with one return code per filter (0, 1, 2 granted QoS; 0x80 failure).
pub fn suback(out: &mut BytesMut, pkid: u16, codes: &[u8]) {
    out.put_u8(0x90);
    put_remaining(out, 2 + codes.len());
    out.put_u16(pkid);
    out.put_slice(codes);
}

/// UNSUBACK.
pub fn unsuback(out: &mut BytesMut, pkid: u16) {
    out.put_u8(0xb0);
    out.put_u8(2);
    out.put_u16(pkid);
}

/// PINGRESP.
pub fn pingresp(out: &mut BytesMut) {
    out.put_slice(&[0xd0, 0]);
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::panic)]
    use super::*;

    fn connect_bytes(level: u8, flags: u8, id: &str) -> BytesMut {
        let mut body = BytesMut::new();
        body.put_u16(4);
        body.put_slice(b"MQTT");
        body.put_u8(level);
        body.put_u8(flags);
        body.put_u16(30);
        body.put_u16(id.len() as u16);
        body.put_slice(id.as_bytes());
        let mut out = BytesMut::new();
        out.put_u8(0x10);
        put_remaining(&mut out, body.len());
        out.put_slice(&body);
        out
    }

    #[test]
    fn partial_reads_are_completed() {
        let mut whole = BytesMut::new();
        publish(&mut whole, "a/b", &[7u8; 300], 1, true, 9).unwrap();
        let mut buf = BytesMut::new();
        for (i, b) in whole.iter().enumerate() {
            buf.put_u8(*b);
            let got = decode(&mut buf, 1024).unwrap();
            if i + 1 < whole.len() {
                assert!(got.is_none(), "early packet at byte {i}");
            } else {
                let Some(Packet::Publish(p)) = got else {
                    panic!("no publish")
                };
                assert_eq!(
                    (p.topic.as_str(), p.qos, p.retain, p.pkid),
                    ("a/b", 1, true, 9)
                );
                assert_eq!(p.payload.len(), 300);
            }
        }
        assert!(buf.is_empty());
    }

    #[test]
    fn size_limit_is_checked_from_the_header() {
        let mut buf = BytesMut::new();
        buf.put_slice(&[0x30, 0xff, 0xff, 0x03]);
        assert!(matches!(
            decode(&mut buf, 1024),
            Err(CodecError::TooLarge { .. })
        ));
        let mut buf = BytesMut::from(&[0x30u8, 0xff, 0xff, 0xff, 0xff, 0x01][..]);
        assert_eq!(decode(&mut buf, usize::MAX), Err(CodecError::BadLength));
    }

    #[test]
    fn connect_levels() {
        let mut b = connect_bytes(4, 0x02, "node1");
        let Some(Packet::Connect(c)) = decode(&mut b, 1024).unwrap() else {
            panic!("no connect")
        };
        assert_eq!(c.client_id, "node1");
        assert!(c.clean_session);
        assert_eq!(c.keep_alive, 30);
        let mut b = connect_bytes(5, 0x02, "x");
        assert_eq!(
            decode(&mut b, 1024).unwrap(),
            Some(Packet::UnsupportedProtocol(5))
        );
        let mut b = connect_bytes(4, 0x03, "x");
        assert!(decode(&mut b, 1024).is_err());
    }

    #[test]
    fn subscribe_needs_flags_and_filters() {
        let mut b = BytesMut::from(&[0x82u8, 8, 0, 1, 0, 3, b'a', b'/', b'#', 1][..]);
        assert_eq!(
            decode(&mut b, 1024).unwrap(),
            Some(Packet::Subscribe(1, vec![("a/#".into(), 1)]))
        );
        let mut b = BytesMut::from(&[0x80u8, 8, 0, 1, 0, 3, b'a', b'/', b'#', 1][..]);
        assert!(decode(&mut b, 1024).is_err());
        let mut b = BytesMut::from(&[0x82u8, 2, 0, 1][..]);
        assert!(decode(&mut b, 1024).is_err());
    }

    #[test]
    fn remaining_length_round_trips() {
        for len in [0usize, 127, 128, 16_383, 16_384, 2_097_151, 2_097_152] {
            let mut out = BytesMut::new();
            out.put_u8(0xc0);
            put_remaining(&mut out, len);
            out.resize(out.len() + len, 0);
            // PINGREQ with a body is malformed, but only once the length has parsed.
            let r = decode(&mut out, usize::MAX);
            if len == 0 {
                assert_eq!(r.unwrap(), Some(Packet::PingReq));
            } else {
                assert!(
                    matches!(r, Err(CodecError::Malformed { .. })),
                    "{len}: {r:?}"
                );
            }
        }
    }
}
