//! Replays the fuzz corpus (fuzz/corpus, grown by `make fuzz`) through the pgoutput decoder
//! and the manifest parser on every test run: each input is handled without a panic.

use philotes::manifest::Manifest;
use philotes::pipeline::decode::Decoder;

fn inputs(target: &str) -> Vec<(String, Vec<u8>)> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(target);
    let mut all: Vec<(String, Vec<u8>)> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .filter_map(|e| e.ok())
        .map(|e| {
            (
                e.file_name().to_string_lossy().into_owned(),
                std::fs::read(e.path()).expect("read corpus file"),
            )
        })
        .collect();
    all.sort();
    assert!(all.len() > 100, "the {target} corpus is nearly empty");
    all
}

#[test]
fn decoder_survives_the_corpus() {
    let mut decoded = 0;
    for (name, data) in inputs("decode") {
        let result = std::panic::catch_unwind(|| {
            let mut d = Decoder::new();
            data.split(|&b| b == 0xFF)
                .filter(|m| d.decode(m).is_ok())
                .count()
        });
        decoded +=
            result.unwrap_or_else(|_| panic!("decoder panicked on fuzz/corpus/decode/{name}"));
    }
    assert!(
        decoded > 100,
        "the corpus exercises successful decoding too"
    );
}

#[test]
fn manifest_parser_survives_the_corpus() {
    let mut accepted = 0;
    for (name, data) in inputs("manifest") {
        let Ok(text) = String::from_utf8(data) else {
            continue;
        };
        let ok = std::panic::catch_unwind(|| Manifest::parse(&text, "corpus").is_ok())
            .unwrap_or_else(|_| panic!("manifest parser panicked on fuzz/corpus/manifest/{name}"));
        accepted += ok as usize;
    }
    assert!(accepted > 10);
}
