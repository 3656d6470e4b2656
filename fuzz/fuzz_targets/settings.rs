//! The settings parsers, as `sdserve start` and the repository API run them: `settings.json`
//! (`ServerSettings::load`), `model-settings.json` (`ModelSettings::from_file`, then the
//! `parameters.extra` sections), and single `MLSERVER_*` / `MLSERVER_MODEL_*` variables. The
//! first byte picks the parser; the rest is the file or the variable's value. Any panic is a
//! finding, including in the helpers the server calls right after parsing.

#![no_main]

use std::path::PathBuf;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use sdserve_settings::{Env, MODEL_SETTINGS, ModelSettings, SERVER_SETTINGS, ServerSettings};

/// A scratch repository of this fuzzing process: `<tmp>/repo/model/`.
fn scratch() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir =
            std::env::temp_dir().join(format!("sdserve-fuzz-settings-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("repo").join("model")).expect("scratch folder");
        dir
    })
}

fn use_server(s: &ServerSettings) {
    let _ = s.validate();
    let _ = s.to_json();
    let _ = s.request_timeout_duration();
    let _ = s.drain_timeout_duration();
    let _ = s.unsupported_warnings();
}

fn use_model(m: &ModelSettings) {
    let _ = m.version();
    let _ = m.uri();
    let _ = serde_json::to_value(m);
    if let Ok(l) = sdserve_settings::extra::limits(&m.parameters.extra) {
        assert!(
            l.max_prompts > 0
                && l.max_images > 0
                && l.max_pixels > 0
                && l.max_num_inference_steps > 0
        );
        assert!(l.max_guidance_scale.is_finite() && l.max_guidance_scale >= 0.0);
    }
    if let Ok(d) = sdserve_settings::extra::defaults(&m.parameters.extra) {
        assert!(d.num_inference_steps > 0 && d.guidance_scale.is_finite());
    }
}

fn empty_env() -> Env {
    Env::new(std::iter::empty::<(&str, String)>(), scratch())
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let repo = scratch().join("repo");
    let (mut warnings, mut notes) = (Vec::new(), Vec::new());
    match mode % 4 {
        0 => {
            std::fs::write(repo.join("settings.json"), rest).expect("writing settings.json");
            if let Ok((s, _)) = ServerSettings::load(&repo, &empty_env()) {
                use_server(&s);
            }
        }
        1 => {
            let path = repo.join("model").join("model-settings.json");
            std::fs::write(&path, rest).expect("writing model-settings.json");
            if let Ok(m) = ModelSettings::from_file(&path, &empty_env(), &mut warnings, &mut notes)
            {
                use_model(&m);
            }
        }
        2 => {
            let Some((&pick, value)) = rest.split_first() else {
                return;
            };
            let doc = &SERVER_SETTINGS[pick as usize % SERVER_SETTINGS.len()];
            let env = Env::new(
                [(doc.env, String::from_utf8_lossy(value).into_owned())],
                scratch(),
            );
            if let Ok(s) = ServerSettings::from_sources(None, &env, &mut warnings) {
                use_server(&s);
            }
        }
        _ => {
            let Some((&pick, value)) = rest.split_first() else {
                return;
            };
            let doc = &MODEL_SETTINGS[pick as usize % MODEL_SETTINGS.len()];
            let value = String::from_utf8_lossy(value).into_owned();
            // A model from variables needs an implementation; give one unless that is the pick.
            let mut vars = vec![(doc.env, value)];
            if doc.env != "MLSERVER_MODEL_IMPLEMENTATION" {
                vars.push((
                    "MLSERVER_MODEL_IMPLEMENTATION",
                    "sdserve.StableDiffusion".into(),
                ));
            }
            let env = Env::new(vars, scratch());
            if let Ok(m) = ModelSettings::from_env(&repo, &env, &mut warnings, &mut notes) {
                use_model(&m);
            }
        }
    }
});
