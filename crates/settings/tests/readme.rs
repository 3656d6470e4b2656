//! README.md embeds `sdserve settings` verbatim; this keeps the two identical.

#[test]
fn readme_settings_reference_is_current() {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../README.md"))
        .expect("README.md");
    let begin = "<!-- settings:begin -->\n";
    let end = "<!-- settings:end -->";
    let start = readme.find(begin).expect("settings:begin marker") + begin.len();
    let stop = readme.find(end).expect("settings:end marker");
    assert_eq!(
        &readme[start..stop],
        sdserve_settings::settings_reference(),
        "README.md's settings reference is stale: paste the output of `sdserve settings` between the markers"
    );
}
