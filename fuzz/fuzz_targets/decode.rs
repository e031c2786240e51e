//! pgoutput decoding: any byte sequence is decoded or refused, never a panic. The input is
//! split into messages at 0xFF bytes, so one input can describe a relation and then change it.
#![no_main]
use libfuzzer_sys::fuzz_target;
use philotes::pipeline::decode::Decoder;

fuzz_target!(|data: &[u8]| {
    let mut decoder = Decoder::new();
    for message in data.split(|&b| b == 0xFF) {
        let _ = decoder.decode(message);
    }
});
