//! Greedy answers of the real model to fixed prompts, kept as golden files
//! (`fixtures/golden/*.txt`) so any change in output is seen. Regenerate
//! deliberately with `STRATA_BLESS=1`.

use strata_model::{
    ChatMessage, ChatTemplate, Gguf, LlamaModel, LoadOptions, Logits, Sampler, SamplingParams,
    SeqInput, Tokenizer,
};
use strata_store::{Arena, BlockId, TokenId};

use crate::real_model::model_path;

const PROMPTS: [(&str, &str); 3] = [
    (
        "capital",
        "What is the capital of France? Answer in one sentence.",
    ),
    ("haiku", "Write a haiku about the sea."),
    ("count", "Count from 1 to 10, separated by commas."),
];

fn generate(model: &LlamaModel, tok: &Tokenizer, prompt: &[TokenId], max: usize) -> Vec<TokenId> {
    let bs = 16;
    let blocks = (prompt.len() + max).div_ceil(bs);
    let mut arena = Arena::new(model.arena_layout(blocks, bs)).unwrap();
    let table: Vec<BlockId> = (0..blocks as u32).map(BlockId::new).collect();
    let mut sampler = Sampler::new(SamplingParams::greedy(), prompt);
    let mut out = Vec::new();
    let mut input = prompt.to_vec();
    let mut pos = 0;
    while out.len() < max {
        let logits = model
            .forward(
                &mut arena,
                &[SeqInput {
                    tokens: &input,
                    start: pos,
                    block_table: &table,
                    logits: Logits::Last,
                }],
            )
            .unwrap();
        pos += input.len();
        let t = sampler.sample(&logits[0]).token;
        if tok.eos().contains(&t) {
            break;
        }
        out.push(t);
        input = vec![t];
    }
    out
}

#[test]
fn real_model_greedy_answers_match_the_golden_files() {
    let mut g = Gguf::open(&model_path()).unwrap();
    let tok = Tokenizer::from_gguf(g.content()).unwrap();
    let tpl = ChatTemplate::from_gguf(g.content(), &tok).unwrap().unwrap();
    let model = LlamaModel::load(
        &mut g,
        LoadOptions {
            threads: 2,
            requantize: false,
        },
    )
    .unwrap();
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/golden");
    let bless = std::env::var_os("STRATA_BLESS").is_some();
    let mut failures = Vec::new();
    for (name, question) in PROMPTS {
        let prompt = tpl
            .apply(&tok, &[ChatMessage::new("user", question)], true)
            .unwrap();
        let answer = generate(&model, &tok, &prompt, 48);
        let ids: Vec<String> = answer.iter().map(|t| t.get().to_string()).collect();
        let got = format!("{}\n---\n{}\n", ids.join(" "), tok.decode(&answer, false));
        let path = dir.join(format!("{name}.txt"));
        if bless {
            std::fs::write(&path, &got).unwrap();
            continue;
        }
        let want = std::fs::read_to_string(&path).unwrap_or_default();
        if got != want {
            failures.push(format!("{name}: got\n{got}\nwant\n{want}"));
        }
    }
    assert!(
        failures.is_empty(),
        "greedy output changed (STRATA_BLESS=1 to accept):\n{}",
        failures.join("\n")
    );
}
