//! The CI check for the GPU path on a machine without a GPU: every kernel source compiles with
//! NVRTC to PTX for sm_80 and sm_90 and defines every entry point the backend loads.
//!
//! NVRTC comes from the `nvidia-cuda-nvrtc-cu12` wheel (scripts/test.sh installs it and puts its
//! lib dir on LD_LIBRARY_PATH, and sets QUIVER_REQUIRE_NVRTC=1 so a missing library fails CI
//! instead of skipping).

use quiver_cuda::kernels::{compile_ptx, nvrtc_available, SOURCES};

#[test]
fn every_kernel_compiles_to_ptx_for_sm80_and_sm90() {
    if !nvrtc_available() {
        assert!(
            std::env::var_os("QUIVER_REQUIRE_NVRTC").is_none(),
            "QUIVER_REQUIRE_NVRTC is set but libnvrtc cannot be loaded (LD_LIBRARY_PATH?)"
        );
        eprintln!("skipped: libnvrtc not found; scripts/test.sh installs it");
        return;
    }
    for (name, src, entries) in SOURCES {
        for arch in ["sm_80", "sm_90"] {
            let ptx = compile_ptx(name, src, arch).unwrap_or_else(|e| panic!("{e}"));
            assert!(
                ptx.contains(&format!(".target {arch}")),
                "{name} for {arch}: wrong target"
            );
            for entry in *entries {
                assert!(
                    ptx.contains(&format!(".entry {entry}(")),
                    "{name}.cu for {arch} lacks the entry point {entry}"
                );
            }
        }
    }
}

#[test]
fn a_broken_kernel_is_a_compile_error_with_the_log() {
    if !nvrtc_available() {
        return;
    }
    let err = compile_ptx(
        "broken",
        "extern \"C\" __global__ void k() { undefined_thing(); }",
        "sm_80",
    )
    .expect_err("must not compile");
    let text = err.to_string();
    assert!(
        text.contains("broken") && text.contains("sm_80") && text.contains("undefined_thing"),
        "{text}"
    );
}
