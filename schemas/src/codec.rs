//! The servers' gRPC codec: tonic's prost codec, except for a request that does not decode.
//!
//! tonic answers those `INTERNAL` with prost's error text. Here they are the caller's fault
//! (bytes that are not the method's message, or `google.protobuf.Struct` data nested past
//! prost's recursion limit of 100), so they are answered `INVALID_ARGUMENT`: `INTERNAL` is a
//! server error, counted by the `HighErrorRate` alert and marked as an error on traces, and
//! one client sending garbage must not page the on-call. The text is kept short: for deep
//! nesting prost's names every level it went through.
use std::marker::PhantomData;

use prost::Message;
use tonic::codec::{BufferSettings, Codec, DecodeBuf, Decoder};
use tonic::Status;
use tonic_prost::{ProstCodec, ProstEncoder};

/// How much of prost's description a status keeps (its end: the outer fields and the reason).
const DETAIL_CHARS: usize = 200;

#[derive(Debug, Clone)]
pub struct RequestCodec<T, U>(PhantomData<(T, U)>);

impl<T, U> Default for RequestCodec<T, U> {
    fn default() -> Self {
        RequestCodec(PhantomData)
    }
}

impl<T, U> Codec for RequestCodec<T, U>
where
    T: Message + Send + 'static,
    U: Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = RequestDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        ProstCodec::<T, U>::default().encoder()
    }

    fn decoder(&mut self) -> Self::Decoder {
        RequestDecoder(PhantomData)
    }
}

#[derive(Debug)]
pub struct RequestDecoder<U>(PhantomData<U>);

impl<U: Message + Default> Decoder for RequestDecoder<U> {
    type Item = U;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
        U::decode(buf).map(Some).map_err(|e| undecodable::<U>(&e))
    }

    fn buffer_settings(&self) -> BufferSettings {
        BufferSettings::default()
    }
}

fn undecodable<U>(error: &prost::DecodeError) -> Status {
    let full = error.to_string();
    let detail = full
        .strip_prefix("failed to decode Protobuf message: ")
        .unwrap_or(&full);
    let count = detail.chars().count();
    let detail = if count > DETAIL_CHARS {
        let tail: String = detail.chars().skip(count - DETAIL_CHARS).collect();
        format!("…{tail}")
    } else {
        detail.to_string()
    };
    let message = std::any::type_name::<U>().rsplit("::").next().unwrap_or("");
    Status::invalid_argument(format!(
        "the request is not a valid {message}: {detail}; encode it from the service's .proto (data nests at most 100 levels)"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metering::v1::IngestEventsRequest;

    #[test]
    fn deep_nesting_is_the_callers_error_with_a_short_message() {
        let mut value = prost_types::Value {
            kind: Some(prost_types::value::Kind::NumberValue(1.0)),
        };
        for _ in 0..150 {
            let mut fields = std::collections::BTreeMap::new();
            fields.insert("n".to_string(), value);
            value = prost_types::Value {
                kind: Some(prost_types::value::Kind::StructValue(prost_types::Struct {
                    fields,
                })),
            };
        }
        let bytes = prost_types::Struct {
            fields: [("n".to_string(), value)].into_iter().collect(),
        }
        .encode_to_vec();
        let error = prost_types::Struct::decode(bytes.as_slice()).unwrap_err();
        let status = undecodable::<IngestEventsRequest>(&error);
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
        assert!(status.message().len() < 400, "{}", status.message());
        assert!(
            status
                .message()
                .starts_with("the request is not a valid IngestEventsRequest: …"),
            "{}",
            status.message()
        );
        assert!(status.message().contains("recursion limit reached"));
    }
}
