//! The pgoutput decoder on arbitrary bytes: an error is fine, a panic is a bug. Decoded row
//! changes are also encoded into events, so the encoder sees whatever the decoder accepts.
#![no_main]

use libfuzzer_sys::fuzz_target;
use walstream::fuzzing::decode_and_encode;

fuzz_target!(|data: &[u8]| {
    decode_and_encode(data);
});
