//! README's quick start stays true: the folder its start command serves, the request its curl
//! sends and the picture it shows (`docs/quickstart.png`) are read from README.md and replayed
//! against the real binary.

use base64::Engine;
use sdserve_tests::*;

fn readme() -> String {
    std::fs::read_to_string(workspace_root().join("README.md")).expect("reading README.md")
}

/// The first line of README.md that contains `needle`.
fn line_with<'a>(text: &'a str, needle: &str) -> &'a str {
    text.lines()
        .find(|l| l.contains(needle))
        .unwrap_or_else(|| panic!("README.md has no line with {needle:?}"))
}

/// The word after `marker` on `line`.
fn word_after<'a>(line: &'a str, marker: &str) -> &'a str {
    let rest = &line[line.find(marker).expect("marker") + marker.len()..];
    rest.split_whitespace()
        .next()
        .expect("a word after the marker")
}

/// The JSON between `-d '` and the next `'` of the quick start's curl command.
fn curl_body(text: &str) -> Value {
    let start = text
        .find("-d '")
        .expect("README.md has a curl -d '...' body")
        + 4;
    let end = start
        + text[start..]
            .find('\'')
            .expect("closing quote of the curl body");
    serde_json::from_str(&text[start..end]).unwrap_or_else(|e| {
        panic!(
            "the README's curl body is not JSON ({e}): {}",
            &text[start..end]
        )
    })
}

/// (width, height, RGB bytes) of a PNG file.
fn rgb(png_bytes: &[u8]) -> (u32, u32, Vec<u8>) {
    let mut reader = png::Decoder::new(std::io::Cursor::new(png_bytes))
        .read_info()
        .expect("a PNG");
    let mut buf = vec![0; reader.output_buffer_size().expect("PNG buffer size")];
    let frame = reader.next_frame(&mut buf).expect("PNG pixels decode");
    assert_eq!(frame.color_type, png::ColorType::Rgb, "RGB pixels");
    buf.truncate(frame.buffer_size());
    (frame.width, frame.height, buf)
}

#[test]
fn readme_quick_start_serves_the_picture_it_shows() {
    let text = readme();
    let folder = word_after(
        line_with(&text, "cargo run --release -p sdserve -- start "),
        "-- start ",
    );
    let url = word_after(line_with(&text, "curl -s localhost:8080"), "localhost:8080");
    let body = curl_body(&text);
    assert!(
        text.contains("<img src=\"docs/quickstart.png\""),
        "README.md shows docs/quickstart.png"
    );

    let server = launch_folder(&workspace_root().join(folder)).start();
    let reply = server.post(url, &body);
    reply.expect(200);
    let response = reply.json();
    assert_eq!(image_sizes(&response), vec![(64, 64)]);
    let b64 = response["outputs"][0]["data"][0].as_str().expect("image");
    let served = base64::engine::general_purpose::STANDARD
        .decode(b64)
        .expect("base64");
    let shown = std::fs::read(workspace_root().join("docs/quickstart.png"))
        .expect("reading docs/quickstart.png");

    // Same picture, up to float rounding that other CPUs may bring.
    let (w, h, a) = rgb(&served);
    let (sw, sh, b) = rgb(&shown);
    assert_eq!((w, h), (sw, sh), "size of the served and the shown picture");
    let diffs: Vec<u8> = a.iter().zip(&b).map(|(x, y)| x.abs_diff(*y)).collect();
    let max = diffs.iter().copied().max().unwrap_or(0);
    let mean = diffs.iter().map(|&d| d as f64).sum::<f64>() / diffs.len() as f64;
    assert!(
        max <= 8 && mean < 0.5,
        "the server's picture differs from docs/quickstart.png: max {max}, mean {mean:.3} (of 255)"
    );
}
