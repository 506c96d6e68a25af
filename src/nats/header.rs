//! Numbers as NATS header values, written by itoa rather than the formatting machinery:
//! every event carries several.

use async_nats::header::HeaderValue;

pub fn number(value: impl itoa::Integer) -> HeaderValue {
    HeaderValue::from(itoa::Buffer::new().format(value))
}

#[cfg(test)]
mod tests {
    #[test]
    fn numbers_read_as_decimal() {
        assert_eq!(super::number(0u64).as_str(), "0");
        assert_eq!(super::number(u64::MAX).as_str(), "18446744073709551615");
        assert_eq!(super::number(4_294_967_295u32).as_str(), "4294967295");
    }
}
