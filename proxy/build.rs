//! Builds the eBPF programs in `proxy-ebpf/` (nightly + bpf-linker, see
//! `cargo xtask setup`) so the proxy can embed the object file.
use std::path::Path;

fn main() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../proxy-ebpf");
    let root = root.canonicalize().expect("proxy-ebpf/ next to proxy/");
    // aya-build runs `cargo build --package …` from the current directory.
    std::env::set_current_dir(&root).expect("enter proxy-ebpf/");
    let package = aya_build::Package {
        name: "nodeway-ebpf",
        root_dir: root.to_str().expect("UTF-8 path"),
        ..Default::default()
    };
    if let Err(err) = aya_build::build_ebpf([package], aya_build::Toolchain::default()) {
        panic!(
            "building the eBPF programs failed: {err:#}\n\
             They need a nightly toolchain with rust-src and bpf-linker; \
             `cargo xtask setup` installs both."
        );
    }
}
