//! Input images are resized exactly as Pillow's `Image.resize(..., LANCZOS)` (what diffusers'
//! `VaeImageProcessor` calls) resizes them: byte for byte against Pillow's own output
//! (`models/reference/img2img/resize_*.png`, made by `make_image_references.py`).

use std::path::PathBuf;

use sdserve_generation::decode_rgb;

fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../models/reference/img2img")
}

#[test]
fn lanczos_resizes_equal_pillows_byte_for_byte() {
    let read = |name: &str| decode_rgb(&std::fs::read(dir().join(name)).unwrap(), 1 << 20).unwrap();
    let source = read("input_odd.png");
    assert_eq!((source.width, source.height), (67, 61));
    for (w, h) in [(64, 56), (32, 24), (128, 96), (67, 61)] {
        let expected = read(&format!("resize_{w}x{h}.png"));
        let ours = source.resized(w, h);
        let worst = ours
            .rgb
            .iter()
            .zip(expected.rgb.iter())
            .map(|(a, b)| a.abs_diff(*b))
            .max()
            .unwrap();
        assert_eq!((ours.width, ours.height), (w, h));
        assert_eq!(worst, 0, "{w}×{h}: max difference {worst}");
    }
}
