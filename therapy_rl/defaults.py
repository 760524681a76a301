"""Default ``ConfigDict``s that the files in ``configs/`` start from. Pure data: no package imports.

Every field has a short comment; units are in the names. Override any of them on the command line with
``--config.section.field=value``.
"""

import ml_collections


def data_defaults() -> ml_collections.ConfigDict:
    d = ml_collections.ConfigDict()
    d.source = "bundled_sample"  # bundled_sample | mesc | esconv | jsonl
    d.data_dir = ""  # dataset folder; "" = $THERAPY_RL_DATA/<source> for mesc and esconv
    d.train_path = ""  # jsonl source: train file
    d.val_path = ""  # jsonl source: validation file
    d.test_path = ""  # jsonl source: test file
    d.strict = True  # bad records: True = fail with file:line:field, False = skip and count
    d.max_length_tokens = 128  # fixed sequence length of SFT batches
    d.drop_long = True  # True = drop sequences over max_length_tokens (the paper), False = truncate the user text
    d.include_therapist_emotion = True  # False = the paper's "SFT (no emotion)" ablation
    d.include_strategy = False  # tag each therapist turn with its strategy
    d.context_turns = 0  # previous turns given as context (0 = the paper's format)
    d.user_emotion_from = "last"  # first | last client utterance of the run
    d.therapist_run = "first"  # first utterance of a therapist run (the paper) | merge the run
    d.problem_type = "unknown"  # problem-type policy for MESC (see data/SCHEMA.md)
    d.max_train_samples = 0  # 0 = all; else a deterministic prefix of the shuffled samples (smoke runs)
    d.max_eval_samples = 0  # 0 = all validation samples
    d.max_prompt_tokens = 96  # fixed prompt length for generation (left-padded)
    d.esconv_emotion_map = ml_collections.ConfigDict()  # ESConv emotion -> MESC label; empty = the documented default
    d.esconv_supporter_emotion = "neutral"  # ESConv has no supporter emotion: this label is used for every reply
    return d


def model_defaults() -> ml_collections.ConfigDict:
    m = ml_collections.ConfigDict()
    m.hf_checkpoint = ""  # local HF GPT-2 directory (config.json + model.safetensors); "" = train from scratch
    m.n_layer = 12  # GPT-2 small shape unless an HF checkpoint sets it
    m.n_head = 12
    m.n_embd = 768
    m.n_positions = 1024
    m.dropout_rate = 0.1
    m.dtype = "float32"  # compute dtype: float32 | bfloat16
    m.remat = False  # rematerialise blocks to save memory
    return m


def tokenizer_defaults() -> ml_collections.ConfigDict:
    t = ml_collections.ConfigDict()
    t.path = ""  # local HF tokenizer dir; "" = the hf_checkpoint's, or train a BPE on the training text
    t.bpe_vocab_size = 8000  # vocabulary of the BPE trained from scratch
    return t


def mesh_defaults() -> ml_collections.ConfigDict:
    mesh = ml_collections.ConfigDict()
    mesh.data = -1  # -1 = all remaining devices
    mesh.fsdp = 1
    mesh.tensor = 1
    return mesh


def sampling_defaults() -> ml_collections.ConfigDict:
    s = ml_collections.ConfigDict()
    s.max_new_tokens = 64
    s.temperature = 1.0
    s.top_k = 0  # 0 = off
    s.top_p = 1.0  # 1.0 = off
    s.greedy = False
    return s


def sft_defaults() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.mode = "sft"
    c.seed = 42
    c.data = data_defaults()
    c.model = model_defaults()
    c.tokenizer = tokenizer_defaults()
    c.mesh = mesh_defaults()

    c.global_batch_size = 32  # sequences per optimizer step, over all hosts
    c.grad_accum_steps = 1  # micro-batches per step (global_batch_size must divide evenly)
    c.num_epochs = 20.0
    c.max_steps = 0  # 0 = num_epochs worth of steps
    c.learning_rate = 2e-5
    c.warmup_fraction = 0.1
    c.lr_schedule = "linear"  # linear | cosine | constant
    c.weight_decay = 0.0
    c.grad_clip_norm = 1.0

    c.log_every_steps = 10
    c.eval_every_steps = 200  # validation loss; also decides the best checkpoint
    c.checkpoint_every_steps = 200
    c.keep_checkpoints = 2  # last-N checkpoints kept for resuming (the best one is kept separately)
    c.early_stopping_patience_evals = 0  # 0 = off; else stop after this many evals without improvement
    c.eval_batch_size = 64
    c.progress_bar = True

    c.num_sample_replies = 4  # replies printed for validation prompts at the end
    c.sampling = sampling_defaults()
    c.export_hf = False  # also write the final params as an HF GPT-2 directory (hf_export/)
    return c
