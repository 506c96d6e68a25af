//! Text values of every kind to JSON: the output must always be valid JSON.
#![no_main]

use libfuzzer_sys::fuzz_target;
use walstream::fuzzing::encode_value_checked;

fuzz_target!(|data: &[u8]| {
    encode_value_checked(data);
});
