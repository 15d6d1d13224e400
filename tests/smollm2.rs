//! The real default model (SmolLM2-135M-Instruct imported from its GGUF) against an independent
//! float64 numpy forward over the GGUF's own tensors, and a greedy chat answer.

mod common;

use std::sync::Arc;

use candle_core::{DType, Device};
use common::*;
use pruneserve::chat_template::ChatMessage;
use pruneserve::engine::sample::sampler::SamplingParams;
use pruneserve::loaded::LoadedModel;
use pruneserve::plan::LayerPlan;
use serde_json::json;

const TEXTS: [&str; 5] = [
    "The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs, said the sphinx.",
    "Photosynthesis is the process by which green plants and some other organisms use sunlight to synthesize foods from carbon dioxide and water. Photosynthesis in plants generally involves the green pigment chlorophyll and generates oxygen as a byproduct.",
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n\nprint([fibonacci(i) for i in range(10)])\n",
    "Question: Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. How many clips did Natalia sell altogether in April and May?\nAnswer: Natalia sold 48/2 = 24 clips in May. Natalia sold 48+24 = 72 clips altogether in April and May. #### 72",
    "In 1492, Columbus sailed the ocean blue. The voyage, funded by the Spanish crown, was meant to find a western route to Asia; instead it reached the Caribbean, opening centuries of contact, trade and conquest between Europe and the Americas. Historians still debate the consequences: the exchange of crops such as maize, potatoes and wheat, the spread of diseases that devastated indigenous populations, and the rise of Atlantic empires. Schoolchildren learn the rhyme, but the history behind it is far more complicated than any rhyme can convey, and it deserves careful study.",
];

#[test]
fn prompt_logprobs_match_the_gguf_reference() {
    let loaded =
        LoadedModel::load(smollm2_dir().to_str().unwrap(), &Device::Cpu, DType::F32).unwrap();
    let prompts: Vec<Vec<u32>> = TEXTS
        .iter()
        .map(|t| loaded.encode(t, false).unwrap())
        .collect();
    for p in &prompts {
        assert!(
            (20..=200).contains(&p.len()),
            "prompt of {} tokens",
            p.len()
        );
    }
    let plan = Arc::new(LayerPlan::full(30));
    let ours = score_all(&loaded.model, &plan, &prompts);
    let reference = run_python(
        "llama_gguf_reference.py",
        &json!({"gguf": smollm2_gguf(), "prompts": prompts}),
    );
    let want: Vec<Vec<f64>> = serde_json::from_value(reference["logprobs"].clone()).unwrap();
    for (i, (o, w)) in ours.iter().zip(&want).enumerate() {
        let d = max_abs_diff(o, w);
        let mean: f64 = w.iter().sum::<f64>() / w.len() as f64;
        println!(
            "prompt {i}: {} tokens, max abs diff {d:.2e} nats, mean logprob {mean:.3}",
            prompts[i].len()
        );
        assert!(d < 1e-3, "prompt {i}: max abs diff {d}");
        // A real language model, not noise: natural text is far more likely than uniform.
        assert!(mean > -5.0, "prompt {i}: mean logprob {mean}");
    }
}

#[test]
fn tokenizer_round_trips_and_knows_the_chat_tokens() {
    let loaded =
        LoadedModel::load(smollm2_dir().to_str().unwrap(), &Device::Cpu, DType::F32).unwrap();
    for t in TEXTS {
        let ids = loaded.encode(t, false).unwrap();
        assert_eq!(loaded.decode(&ids), t);
    }
    assert_eq!(loaded.encode("<|im_start|>user", false).unwrap()[0], 1);
    // SmolLM2's pre-tokenizer splits digits individually.
    let ids = loaded.encode("2024", false).unwrap();
    assert_eq!(ids.len(), 4);
}

#[test]
fn greedy_chat_names_paris() {
    let loaded =
        LoadedModel::load(smollm2_dir().to_str().unwrap(), &Device::Cpu, DType::F32).unwrap();
    let tmpl = loaded
        .chat_template
        .as_ref()
        .expect("chat template imported from the GGUF");
    let text = tmpl
        .render(
            &[ChatMessage {
                role: "user".into(),
                content: "What is the capital of France?".into(),
            }],
            true,
        )
        .unwrap();
    assert!(text.ends_with("<|im_start|>assistant\n"), "{text:?}");
    let prompt = loaded.encode(&text, false).unwrap();
    let plan = Arc::new(LayerPlan::full(30));
    let req = gen_request(
        &plan,
        prompt,
        24,
        SamplingParams::greedy(),
        &loaded.dir.eos_token_ids,
    );
    let out = batcher(&loaded.model)
        .run_all(vec![req])
        .pop()
        .unwrap()
        .unwrap();
    let answer = loaded.decode(&out.tokens.iter().map(|t| t.token).collect::<Vec<_>>());
    println!("answer: {answer:?}");
    assert!(answer.contains("Paris"), "{answer:?}");
}
