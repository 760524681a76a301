"""A model folder's tokenizer.json and chat template are the run's tokenizer (and survive the copy into the run)."""
from transformers import AutoTokenizer

from therapy_rl.data import tokenize

TEMPLATE = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"


def test_tokenizer_json_and_chat_template_come_from_the_model_dir(tmp_path):
    model_dir, run_copy = tmp_path / "model", tmp_path / "run_tokenizer"
    tokenize.train_bpe_tokenizer(["I feel tired today.", "That sounds hard, tell me more."] * 20, 300, model_dir)
    hf = AutoTokenizer.from_pretrained(str(model_dir))
    hf.chat_template = TEMPLATE
    hf.save_pretrained(str(model_dir))
    assert (model_dir / "tokenizer.json").exists()

    tok = tokenize.load_tokenizer(model_dir)
    assert tok.hf.chat_template == TEMPLATE
    tok.save(run_copy)
    again = tokenize.load_tokenizer(run_copy)
    assert again.hf.chat_template == TEMPLATE
    assert again.encode_text("I feel tired today.") == tok.encode_text("I feel tired today.")
    chat = again.hf.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert chat == "[user] hi\n"
