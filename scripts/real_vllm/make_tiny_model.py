#!/usr/bin/env python3
"""Build a tiny, randomly initialised Qwen2ForCausalLM + byte-level BPE tokenizer
entirely offline (no model-hub access), deterministic (fixed seeds).

Usage:  python make_tiny_model.py [OUT_DIR] [--tool-bias]
        (default OUT_DIR: <repo>/.real_vllm/models/tiny-model; install.sh builds both variants)

--tool-bias: still a random transformer, but a few reserved hidden dimensions turn it into a
"bigram-biased" model: the logits get a fixed bias that depends only on the class of the
current token (last character: quote, brace, colon, digit, ...). Under vLLM's grammar
(tool_choice=required / named / strict tools / response_format) this makes JSON close
quickly (strings -> "", objects -> {}), whitespace is suppressed, and <|im_end|> follows
</tool_call>, so forced tool calls come back as *valid* tool_calls within ~40 tokens.
Free text is still random noise (with ~10% '"' tokens) that runs to max_tokens.
Pure model: 0.78 M params, untied variant with --tool-bias: 1.27 M params.

Result: config.json, generation_config.json, model.safetensors (3-5 MB fp32),
tokenizer.json, tokenizer_config.json (with a Qwen/Hermes-style chat template that
supports tools, so vLLM's `--tool-call-parser hermes` works).
"""
import json
import os
import random
import sys

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM, GenerationConfig

_pos = [a for a in sys.argv[1:] if not a.startswith("--")]
_REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
OUT = os.path.abspath(_pos[0] if _pos else os.path.join(_REPO, ".real_vllm", "models", "tiny-model"))
SEED = 1234
VOCAB_TARGET = 4096  # total vocab incl. special tokens

# --------------------------------------------------------------------------------------
# 1. deterministic synthetic English corpus (plus some JSON / tool-call text)
# --------------------------------------------------------------------------------------
WORDS = """the of and to in is it you that he was for on are with as his they be at one have this
from or had by hot word but what some we can out other were all there when up use your how said an
each she which do their time if will way about many then them write would like so these her long make
thing see him two has look more day could go come did number sound no most people my over know water
than call first who may down side been now find any new work part take get place made live where after
back little only round man year came show every good me give our under name very through just form
sentence great think say help low line differ turn cause much mean before move right boy old too same
tell does set three want air well also play small end put home read hand port large spell add even land
here must big high such follow act why ask men change went light kind off need house picture try us
again animal point mother world near build self earth father head stand own page should country found
answer school grow study still learn plant cover food sun four between state keep eye never last let
thought city tree cross farm hard start might story saw far sea draw left late run while press close
night real life few north open seem together next white children begin got walk example ease paper group
always music those both mark often letter until mile river car feet care second book carry took science
eat room friend began idea fish mountain stop once base hear horse cut sure watch color face wood main
enough plain girl usual young ready above ever red list though feel talk bird soon body dog family direct
pose leave song measure door product black short numeral class wind question happen complete ship area
half rock order fire south problem piece told knew pass since top whole king space heard best hour better
true during hundred five remember step early hold west ground interest reach fast verb sing listen six
table travel less morning ten simple several vowel toward war lay against pattern slow center love person
money serve appear road map rain rule govern pull cold notice voice unit power town fine certain fly fall
lead cry dark machine note wait plan figure star box noun field rest correct able pound done beauty drive
stood contain front teach week final gave green oh quick develop ocean warm free minute strong special
mind behind clear tail produce fact street inch multiply nothing course stay wheel full force blue object
decide surface deep moon island foot system busy test record boat common gold possible plane stead dry
wonder laugh thousand ago ran check game shape equate miss brought heat snow tire bring yes distant fill
east paint language among weather city temperature search query result function tool call arguments""".split()
NAMES = ["get_weather", "search", "lookup", "calculator", "send_email", "get_time", "read_file", "add"]
KEYS = ["city", "query", "location", "unit", "a", "b", "expression", "path", "to", "subject"]


def make_corpus(rng: random.Random, n_sentences: int = 60000) -> list[str]:
    lines = []
    for i in range(n_sentences):
        n = rng.randint(4, 18)
        s = " ".join(rng.choice(WORDS) for _ in range(n))
        s = s[0].upper() + s[1:] + rng.choice([".", ".", ".", "?", "!"])
        if rng.random() < 0.1:
            s += f" {rng.randint(0, 10000)}"
        lines.append(s)
        if i % 20 == 0:
            args = {rng.choice(KEYS): rng.choice([rng.choice(WORDS), rng.randint(0, 999), True, 3.5])}
            if i % 40 == 0:
                args = {}          # together with the line below: BPE merges ' {}' / ' {}}'
                lines.append("empty object {} and empty list [] here")
            lines.append('<tool_call>\n{"name": "%s", "arguments": %s}\n</tool_call>'
                         % (rng.choice(NAMES), json.dumps(args)))
    return lines


# --------------------------------------------------------------------------------------
# 2. tokenizer: byte-level BPE (covers every byte, so any string/JSON is encodable)
# --------------------------------------------------------------------------------------
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]          # special=True
EXTRA = ["<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>",
         "<think>", "</think>"]                                      # added, special=False (as in Qwen2.5)

CHAT_TEMPLATE = r"""{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are a helpful assistant.' }}
    {%- endif %}
    {{- "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}
    {%- else %}
        {{- '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\n' + (message.content if message.content is string else '') + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\n<tool_call>\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {%- if tool_call.arguments is string %}
                {{- tool_call.arguments }}
            {%- else %}
                {{- tool_call.arguments | tojson }}
            {%- endif %}
            {{- '}\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {{- message.content }}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}
"""


def build_tokenizer(corpus: list[str]) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_TARGET - len(SPECIAL) - len(EXTRA),
        min_frequency=2,
        special_tokens=[],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        additional_special_tokens=[],
        model_max_length=4096,
        clean_up_tokenization_spaces=False,
    )
    fast.add_special_tokens({"additional_special_tokens": SPECIAL})
    fast.add_tokens(EXTRA, special_tokens=False)
    fast.chat_template = CHAT_TEMPLATE
    return fast


# next-token logit biases (in logit units) per class of the *current* token
N_CLASSES = 8
C_OTHER, C_OPEN, C_QUOTE, C_COLON, C_CLOSE, C_DIGIT, C_TOOLEND, C_COMMA = range(N_CLASSES)


def token_class(s: str) -> int:
    if s == "</tool_call>" or s.endswith(">"):
        return C_TOOLEND       # also when the end tag was spelled out piece by piece
    t = s.rstrip(" ")
    if not t:
        # a lone space token in JSON follows ':' or ',' -> a value/key starts next
        return C_COLON if s else C_OTHER
    last = t[-1]
    if last in "{[":
        return C_OPEN
    if last == '"':
        return C_QUOTE
    if last == ":":
        return C_COLON
    if last in "}]":
        return C_CLOSE
    if last.isdigit() or last == ".":
        return C_DIGIT
    if last == ",":
        return C_COMMA
    return C_OTHER


def apply_tool_bias(model, tok) -> None:
    """Reserve hidden dims [0, N_CLASSES) as a one-hot 'class of current token' channel."""
    E = model.model.embed_tokens.weight
    W = model.lm_head.weight
    V, H = E.shape
    ids = lambda *toks: [tok.convert_tokens_to_ids(tok.tokenize(t))[0] for t in toks]  # noqa: E731
    q, lb, rb, ls, rs = ids('"', "{", "}", "[", "]")
    sp_q, sp_empty_obj, empty_obj = ids(' "', " {}", "{}")   # ' {}' / '{}' are tokens thanks to the corpus
    assert tok.decode([sp_empty_obj]) == " {}", "tokenizer lacks the ' {}' merge"
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    strs = [tok.decode([i]) for i in range(V)]
    # whitespace-only tokens and tokens with \r/\t: strongly discouraged everywhere
    ws = [i for i, t in enumerate(strs) if (t.strip() == "" and t != "") or "\r" in t or "\t" in t]
    # Inside a grammar the allowed set is small, so modest biases decide; in free text the
    # same biases barely matter (e^4 vs ~4000 roughly-equal competitors). Only "close the
    # string" has to beat almost the whole vocabulary, hence the larger value.
    rules = {
        C_OPEN: {rb: 4, rs: 4, q: 2},
        C_QUOTE: {q: 9, rb: 5, rs: 4},          # inside a string: close it; after a value: close object
        # value start: any-JSON value -> {} (must beat ~1900 number tokens); string value -> ""
        C_COLON: {sp_empty_obj: 11, empty_obj: 10, lb: 10, sp_q: 6, q: 6, ls: 3},
        C_CLOSE: {rb: 4, rs: 4},
        C_DIGIT: {rb: 4, rs: 3, q: 6},          # number -> close object; inside a string -> close it
        C_COMMA: {q: 3},
        C_TOOLEND: {eos: 12},                   # stop right after </tool_call>
        C_OTHER: {q: 6},                        # ~10% quotes in free text; strings end after ~10 tokens
    }
    with torch.no_grad():
        E[:, :N_CLASSES] = 0.0
        W[:, :N_CLASSES] = 0.0
        for i, t in enumerate(strs):
            E[i, token_class(t)] = 1.0                   # dominates the residual stream
        scale = (H / (1.0 + (H - N_CLASSES) * 0.02 ** 2)) ** 0.5   # ~ value after final RMSNorm
        for c, r in rules.items():
            for tid, b in r.items():
                W[tid, c] = b / scale
        for tid in ws:
            W[tid, :N_CLASSES] = -10.0 / scale


def main() -> None:
    tool_bias = "--tool-bias" in sys.argv
    rng = random.Random(SEED)
    torch.manual_seed(SEED)
    corpus = make_corpus(rng)
    tok = build_tokenizer(corpus)
    vocab_size = len(tok)

    cfg = Qwen2Config(
        vocab_size=vocab_size,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,          # head_dim 32 (CPU attn supports 32/64/80/...)
        num_key_value_heads=2,          # GQA
        max_position_embeddings=4096,
        rope_theta=10000.0,
        rms_norm_eps=1e-6,
        tie_word_embeddings=not tool_bias,
        bos_token_id=tok.convert_tokens_to_ids("<|endoftext|>"),
        eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"),
        pad_token_id=tok.convert_tokens_to_ids("<|endoftext|>"),
        use_sliding_window=False,
    )
    cfg.dtype = "float32"
    model = Qwen2ForCausalLM(cfg)      # random init (std=0.02), seeded above
    model.eval()
    if tool_bias:
        apply_tool_bias(model, tok)
    os.makedirs(OUT, exist_ok=True)
    model.save_pretrained(OUT, safe_serialization=True)
    GenerationConfig(
        bos_token_id=cfg.bos_token_id,
        eos_token_id=[tok.convert_tokens_to_ids("<|im_end|>"), tok.convert_tokens_to_ids("<|endoftext|>")],
        pad_token_id=cfg.pad_token_id,
        do_sample=True, temperature=1.0, top_p=1.0,
    ).save_pretrained(OUT)
    # chat template goes into tokenizer_config.json (not chat_template.jinja)
    tok.save_pretrained(OUT, save_jinja_files=False)
    # transformers 5 writes tokenizer_class "TokenizersBackend"; use the class name that
    # both transformers 4.x and 5.x resolve.
    tc_path = os.path.join(OUT, "tokenizer_config.json")
    with open(tc_path) as f:
        tc = json.load(f)
    tc["tokenizer_class"] = "PreTrainedTokenizerFast"
    with open(tc_path, "w") as f:
        json.dump(tc, f, indent=2, ensure_ascii=False)
        f.write("\n")

    n_params = sum(p.numel() for p in model.parameters())
    print(f"saved to {OUT}: vocab={vocab_size} params={n_params:,} tool_bias={tool_bias}")
    msgs = [{"role": "user", "content": "What is the weather in Paris?"}]
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
    text = tok.apply_chat_template(msgs, tools=tools, tokenize=False, add_generation_prompt=True)
    print(text)
    print("ids of '<tool_call>' / '</tool_call>':", tok.convert_tokens_to_ids(["<tool_call>", "</tool_call>"]))


if __name__ == "__main__":
    main()
