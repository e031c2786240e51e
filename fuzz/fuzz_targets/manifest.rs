//! Manifest parsing and spec resolution: any text is accepted or refused with a message,
//! never a panic.
#![no_main]
use libfuzzer_sys::fuzz_target;
use philotes::manifest::Manifest;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(m) = Manifest::parse(text, "fuzz") {
            for p in &m.pipelines {
                let ns = p.metadata.namespace.as_deref().unwrap_or("default");
                let name = p.metadata.name.as_deref().unwrap_or("x");
                let _ = philotes::pipeline::PipelineConfig::resolve(ns, name, &p.spec, &m);
            }
        }
    }
});
