//! Hand-written prost messages and gRPC framing helpers for the mock service
//! `nodeway.test.Mock` (no protoc needed).
//!
//! ```proto
//! package nodeway.test;
//! service Mock { rpc Call(MockRequest) returns (MockReply); }
//! message MockRequest { string path = 1; bytes payload = 2; }
//! message MockReply { string served_by = 1; bytes payload = 2; }
//! ```

use bytes::{BufMut, Bytes, BytesMut};

/// Full method path of the only RPC of the mock service.
pub const METHOD_PATH: &str = "/nodeway.test.Mock/Call";

/// Request of `nodeway.test.Mock/Call`: `path` selects the mock behaviour
/// (same paths as the HTTP endpoints), `payload` is echoed back.
#[derive(Clone, PartialEq, prost::Message)]
pub struct MockRequest {
    #[prost(string, tag = "1")]
    pub path: String,
    #[prost(bytes = "bytes", tag = "2")]
    pub payload: Bytes,
}

/// Reply of `nodeway.test.Mock/Call`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct MockReply {
    #[prost(string, tag = "1")]
    pub served_by: String,
    #[prost(bytes = "bytes", tag = "2")]
    pub payload: Bytes,
}

/// Encodes one uncompressed gRPC length-prefixed message (5-byte header + body).
pub fn encode_frame<M: prost::Message>(msg: &M) -> Bytes {
    let len = msg.encoded_len();
    let mut buf = BytesMut::with_capacity(5 + len);
    buf.put_u8(0);
    buf.put_u32(u32::try_from(len).unwrap_or(u32::MAX));
    // Encoding into a BytesMut with enough capacity cannot fail.
    let _ = msg.encode(&mut buf);
    buf.freeze()
}

/// Decodes the first length-prefixed message of `data`.
/// Errors if the frame is compressed, truncated or not a valid `M`.
pub fn decode_frame<M: prost::Message + Default>(data: &[u8]) -> Result<M, String> {
    if data.len() < 5 {
        return Err(format!("grpc frame too short: {} bytes", data.len()));
    }
    if data[0] != 0 {
        return Err(format!("unsupported grpc compression flag {}", data[0]));
    }
    let len = u32::from_be_bytes([data[1], data[2], data[3], data[4]]) as usize;
    let Some(body) = data.get(5..5 + len) else {
        return Err(format!(
            "grpc frame announces {len} bytes, only {} present",
            data.len() - 5
        ));
    };
    M::decode(body).map_err(|e| format!("invalid protobuf message: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frame_roundtrip() {
        let req = MockRequest {
            path: "/delay/5".into(),
            payload: Bytes::from_static(b"hello"),
        };
        let frame = encode_frame(&req);
        assert_eq!(frame[0], 0);
        assert_eq!(decode_frame::<MockRequest>(&frame).unwrap(), req);
        assert!(decode_frame::<MockRequest>(&frame[..frame.len() - 1]).is_err());
    }
}
