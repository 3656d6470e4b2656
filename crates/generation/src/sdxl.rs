//! SDXL's request fields: a second prompt per text encoder and the size/crop micro-conditioning,
//! checked against the model and resolved into the job.
//!
//! As diffusers' `StableDiffusionXLPipeline`: `original_size` and `target_size` default to the
//! output size and `crops_coords_top_left` to `(0, 0)`; the negative rows get their own time ids
//! only when both `negative_original_size` and `negative_target_size` are given (then with
//! `negative_crops_coords_top_left`, default `(0, 0)`), and otherwise the prompt rows' ids.
//! `StableDiffusionXLImg2ImgPipeline` builds the negative ids differently: each negative size
//! defaults to its positive one on its own, and the crop is always the prompt rows'
//! `crops_coords_top_left` (its `negative_crops_coords_top_left` is read only by refiners).
//! A refiner (`requires_aesthetics_score`) puts the aesthetic score where the target size was:
//! `aesthetic_score` (default 6) for the prompt rows, and for the negative rows
//! `negative_original_size` (default the original size), `negative_crops_coords_top_left`
//! (default `(0, 0)`) and `negative_aesthetic_score` (default 2.5).

use crate::generator::{ConditioningInputs, ModelDescription};
use crate::job::{AestheticScores, TIME_IDS, TimeIds};
use crate::request::GenerationRequest;
use crate::resolve::ValidationError;

/// Largest size or crop coordinate a time id may hold: far beyond any training resolution, and
/// exact in the F32 the UNet embeds it in.
pub const MAX_TIME_ID: i64 = 1 << 16;

/// diffusers' `StableDiffusionXLImg2ImgPipeline` defaults.
const AESTHETIC_SCORE: f64 = 6.0;
const NEGATIVE_AESTHETIC_SCORE: f64 = 2.5;

/// Refuses SDXL-only fields for models that are not conditioned on them, aesthetic scores for
/// models that are not refiners, and text-to-image for refiners.
pub(crate) fn check_applies(
    request: &GenerationRequest,
    model: &ModelDescription,
) -> Result<(), ValidationError> {
    let aesthetic = [
        ("aesthetic_score", request.aesthetic_score.is_some()),
        (
            "negative_aesthetic_score",
            request.negative_aesthetic_score.is_some(),
        ),
    ];
    match model.conditioning {
        ConditioningInputs::Refiner if request.images.is_none() => {
            return Err(ValidationError(
                "this SDXL refiner only refines images: give an 'image' input".into(),
            ));
        }
        ConditioningInputs::Refiner => return Ok(()),
        ConditioningInputs::PromptsAndSizes => {
            return match aesthetic.iter().find(|(_, given)| *given) {
                Some((name, _)) => Err(ValidationError(format!(
                    "'{name}' only applies to SDXL refiners (requires_aesthetics_score)"
                ))),
                None => Ok(()),
            };
        }
        ConditioningInputs::Prompt => {}
    }
    let prompts = [
        ("prompt_2", request.prompts_2.is_some()),
        ("negative_prompt_2", request.negative_prompts_2.is_some()),
    ];
    let sizes = request.sizes.named().map(|(name, v)| (name, v.is_some()));
    match prompts
        .iter()
        .chain(&sizes)
        .chain(&aesthetic)
        .find(|(_, given)| *given)
    {
        Some((name, _)) => Err(ValidationError(format!(
            "'{name}' only applies to SDXL models; this model is {}",
            model.family
        ))),
        None => Ok(()),
    }
}

/// The job's time ids for an image of `height × width`; `None` for models without them.
pub(crate) fn time_ids(
    request: &GenerationRequest,
    model: &ModelDescription,
    (height, width): (usize, usize),
    image_to_image: bool,
) -> Result<Option<TimeIds>, ValidationError> {
    let sizes = &request.sizes;
    match model.conditioning {
        ConditioningInputs::Prompt => return Ok(None),
        ConditioningInputs::Refiner => return refiner_ids(request, (height, width)).map(Some),
        ConditioningInputs::PromptsAndSizes => {}
    }
    let output = [height as i64, width as i64];
    let crop = checked("crops_coords_top_left", sizes.crops_coords_top_left, [0, 0])?;
    let positive = ids(
        checked("original_size", sizes.original_size, output)?,
        crop,
        checked("target_size", sizes.target_size, output)?,
    );
    let negative_crop = checked(
        "negative_crops_coords_top_left",
        sizes.negative_crops_coords_top_left,
        [0, 0],
    )?;
    let negative = match (sizes.negative_original_size, sizes.negative_target_size) {
        (original, target) if image_to_image => ids(
            checked(
                "negative_original_size",
                original,
                [positive[0], positive[1]].map(i64::from),
            )?,
            crop,
            checked(
                "negative_target_size",
                target,
                [positive[4], positive[5]].map(i64::from),
            )?,
        ),
        (Some(original), Some(target)) => ids(
            checked("negative_original_size", Some(original), output)?,
            negative_crop,
            checked("negative_target_size", Some(target), output)?,
        ),
        (original, target) => {
            // Checked all the same, so that a bad value is a 400 even where diffusers ignores it.
            checked("negative_original_size", original, output)?;
            checked("negative_target_size", target, output)?;
            positive
        }
    };
    Ok(Some(TimeIds {
        positive,
        negative,
        aesthetic: None,
    }))
}

/// A refiner's ids: sizes and crops as the prompt rows', the negative rows' own (or the
/// original size and no crop), and the aesthetic scores.
fn refiner_ids(
    request: &GenerationRequest,
    (height, width): (usize, usize),
) -> Result<TimeIds, ValidationError> {
    let sizes = &request.sizes;
    let output = [height as i64, width as i64];
    let original = checked("original_size", sizes.original_size, output)?;
    let target = checked("target_size", sizes.target_size, output)?;
    let positive = ids(
        original,
        checked("crops_coords_top_left", sizes.crops_coords_top_left, [0, 0])?,
        target,
    );
    let negative = ids(
        checked(
            "negative_original_size",
            sizes.negative_original_size,
            original.map(i64::from),
        )?,
        checked(
            "negative_crops_coords_top_left",
            sizes.negative_crops_coords_top_left,
            [0, 0],
        )?,
        checked("negative_target_size", sizes.negative_target_size, output)?,
    );
    let score = |name: &str, given: Option<f64>, default: f64| {
        let v = given.unwrap_or(default);
        if v.is_finite() && v.abs() <= MAX_TIME_ID as f64 {
            Ok(v as f32)
        } else {
            Err(ValidationError(format!(
                "'{name}' is {v}; it must be a finite number between -{MAX_TIME_ID} and {MAX_TIME_ID}"
            )))
        }
    };
    Ok(TimeIds {
        positive,
        negative,
        aesthetic: Some(AestheticScores {
            positive: score("aesthetic_score", request.aesthetic_score, AESTHETIC_SCORE)?,
            negative: score(
                "negative_aesthetic_score",
                request.negative_aesthetic_score,
                NEGATIVE_AESTHETIC_SCORE,
            )?,
        }),
    })
}

fn ids(original: [u32; 2], crop: [u32; 2], target: [u32; 2]) -> [u32; TIME_IDS] {
    [
        original[0],
        original[1],
        crop[0],
        crop[1],
        target[0],
        target[1],
    ]
}

/// `name`'s pair (or `default`), each value between 0 and [`MAX_TIME_ID`].
fn checked(
    name: &str,
    given: Option<[i64; 2]>,
    default: [i64; 2],
) -> Result<[u32; 2], ValidationError> {
    let pair = given.unwrap_or(default);
    match pair.iter().find(|v| !(0..=MAX_TIME_ID).contains(*v)) {
        Some(v) => Err(ValidationError(format!(
            "'{name}' holds {v}; each value must be between 0 and {MAX_TIME_ID}"
        ))),
        None => Ok(pair.map(|v| v as u32)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::limits::{GenerationDefaults, Limits};
    use crate::request::SizeConditioningInput;

    fn model(conditioning: ConditioningInputs) -> ModelDescription {
        ModelDescription {
            native_height: 64,
            native_width: 64,
            vae_scale_factor: 8,
            latent_channels: 4,
            default_scheduler: "euler".into(),
            schedulers: vec!["euler".into()],
            family: "sdxl".into(),
            conditioning,
            default_strength: Some(crate::generator::DefaultStrength::SDXL),
            masks: crate::generator::MaskInput::Optional,
            dtype: "f32".into(),
            device: "cpu".into(),
            adapters: Vec::new(),
        }
    }

    fn resolve(
        r: &GenerationRequest,
        conditioning: ConditioningInputs,
    ) -> Result<crate::Job, ValidationError> {
        let limits = Limits::default();
        r.resolve(
            &model(conditioning),
            &GenerationDefaults::default(),
            &limits,
            || 1,
        )
    }

    fn req() -> GenerationRequest {
        GenerationRequest {
            prompts: vec!["a".into(), "b".into()],
            height: Some(64),
            width: Some(48),
            ..Default::default()
        }
    }

    const SDXL: ConditioningInputs = ConditioningInputs::PromptsAndSizes;

    #[test]
    fn defaults_are_the_output_size_without_crop() {
        let job = resolve(&req(), SDXL).unwrap();
        let ids = job.settings.time_ids.unwrap();
        assert_eq!(ids.positive, [64, 48, 0, 0, 64, 48]);
        assert_eq!(ids.negative, ids.positive);
        assert_eq!(ids, TimeIds::defaults(64, 48));
        let sd = resolve(&req(), ConditioningInputs::Prompt).unwrap();
        assert_eq!(sd.settings.time_ids, None);
    }

    #[test]
    fn negative_ids_need_both_negative_sizes() {
        let mut r = req();
        r.sizes = SizeConditioningInput {
            original_size: Some([1024, 768]),
            crops_coords_top_left: Some([16, 8]),
            negative_original_size: Some([512, 512]),
            negative_crops_coords_top_left: Some([4, 4]),
            ..Default::default()
        };
        let ids = resolve(&r, SDXL).unwrap().settings.time_ids.unwrap();
        assert_eq!(ids.positive, [1024, 768, 16, 8, 64, 48]);
        assert_eq!(
            ids.negative, ids.positive,
            "one negative size: the prompt's ids"
        );
        r.sizes.negative_target_size = Some([256, 256]);
        let ids = resolve(&r, SDXL).unwrap().settings.time_ids.unwrap();
        assert_eq!(ids.negative, [512, 512, 4, 4, 256, 256]);
    }

    #[test]
    fn second_prompts_are_per_image_and_checked() {
        let mut r = req();
        r.prompts_2 = Some(vec!["x".into()]);
        r.negative_prompts_2 = Some(vec!["n1".into(), "n2".into()]);
        let job = resolve(&r, SDXL).unwrap();
        let got: Vec<_> = job
            .images
            .iter()
            .map(|i| (i.prompt_2.as_deref(), i.negative_prompt_2.as_deref()))
            .collect();
        assert_eq!(got, [(Some("x"), Some("n1")), (Some("x"), Some("n2"))]);
        r.prompts_2 = Some(vec!["x".into(), "y".into(), "z".into()]);
        let err = resolve(&r, SDXL).unwrap_err().0;
        assert!(err.contains("'prompt_2' has 3 elements"), "{err}");
    }

    #[test]
    fn sdxl_fields_are_refused_elsewhere_and_bounded() {
        let mut r = req();
        r.sizes.target_size = Some([512, 512]);
        let err = resolve(&r, ConditioningInputs::Prompt).unwrap_err().0;
        assert!(
            err.contains("'target_size' only applies to SDXL models"),
            "{err}"
        );
        let mut r = req();
        r.prompts_2 = Some(vec!["x".into()]);
        let err = resolve(&r, ConditioningInputs::Prompt).unwrap_err().0;
        assert!(err.contains("'prompt_2' only applies"), "{err}");
        for bad in [[-1, 8], [8, MAX_TIME_ID + 1]] {
            let mut r = req();
            r.sizes.crops_coords_top_left = Some(bad);
            let err = resolve(&r, SDXL).unwrap_err().0;
            assert!(err.contains("'crops_coords_top_left' holds"), "{err}");
        }
        let mut r = req();
        r.sizes.negative_original_size = Some([0, -5]);
        let err = resolve(&r, SDXL).unwrap_err().0;
        assert!(err.contains("'negative_original_size'"), "{err}");
    }

    #[test]
    fn image_to_image_negative_ids_default_side_by_side_with_the_prompt_crop() {
        let sizes = SizeConditioningInput {
            original_size: Some([32, 48]),
            crops_coords_top_left: Some([4, 8]),
            negative_original_size: Some([16, 16]),
            negative_crops_coords_top_left: Some([1, 1]),
            ..Default::default()
        };
        let m = model(ConditioningInputs::PromptsAndSizes);
        let r = GenerationRequest {
            sizes,
            ..Default::default()
        };
        let i2i = time_ids(&r, &m, (64, 64), true).unwrap().unwrap();
        assert_eq!(i2i.positive, [32, 48, 4, 8, 64, 64]);
        assert_eq!(i2i.negative, [16, 16, 4, 8, 64, 64]);
        // Text-to-image: one negative size alone leaves the prompt rows' ids.
        let t2i = time_ids(&r, &m, (64, 64), false).unwrap().unwrap();
        assert_eq!(t2i.negative, t2i.positive);
    }

    #[test]
    fn refiners_take_aesthetic_scores_and_only_refine_images() {
        let m = model(ConditioningInputs::Refiner);
        let plain = GenerationRequest {
            sizes: SizeConditioningInput {
                original_size: Some([32, 48]),
                crops_coords_top_left: Some([4, 8]),
                ..Default::default()
            },
            ..Default::default()
        };
        let ids = time_ids(&plain, &m, (64, 64), true).unwrap().unwrap();
        assert_eq!(ids.row(false), [32.0, 48.0, 4.0, 8.0, 6.0]);
        assert_eq!(ids.row(true), [32.0, 48.0, 0.0, 0.0, 2.5]);
        let scored = GenerationRequest {
            aesthetic_score: Some(7.5),
            negative_aesthetic_score: Some(1.0),
            ..plain.clone()
        };
        let ids = time_ids(&scored, &m, (64, 64), true).unwrap().unwrap();
        assert_eq!((ids.row(false)[4], ids.row(true)[4]), (7.5, 1.0));
        let bad = GenerationRequest {
            aesthetic_score: Some(f64::INFINITY),
            ..plain
        };
        assert!(
            time_ids(&bad, &m, (64, 64), true)
                .unwrap_err()
                .0
                .contains("'aesthetic_score'")
        );
        // Text-to-image on a refiner; scores on a base model.
        let err = resolve(&req(), ConditioningInputs::Refiner).unwrap_err().0;
        assert!(err.contains("only refines images"), "{err}");
        let scored_base = GenerationRequest {
            aesthetic_score: Some(5.0),
            ..req()
        };
        let err = resolve(&scored_base, SDXL).unwrap_err().0;
        assert!(
            err.contains("'aesthetic_score' only applies to SDXL refiners"),
            "{err}"
        );
    }
}
