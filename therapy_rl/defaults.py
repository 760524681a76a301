"""Default ``ConfigDict``s that the files in ``configs/`` start from. Pure data: no package imports.

Every field has a short comment; units are in the names. Override any of them on the command line with
``--config.section.field=value``.
"""

import ml_collections
from ml_collections import config_dict


def unset(section: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """``section`` with every value a typed placeholder: None = not set here (a later stage takes the run's
    value); a sub-section (a map) stays, empty = not set."""
    out = ml_collections.ConfigDict()
    for key, value in section.items():
        out[key] = value if isinstance(value, ml_collections.ConfigDict) else config_dict.placeholder(type(value))
    return out


def data_defaults() -> ml_collections.ConfigDict:
    d = ml_collections.ConfigDict()
    d.source = "bundled_sample"  # bundled_sample | mesc | esconv | jsonl
    d.data_dir = ""  # dataset folder; "" = $THERAPY_RL_DATA/<source> for mesc and esconv
    d.train_path = ""  # jsonl source: train file
    d.val_path = ""  # jsonl source: validation file
    d.test_path = ""  # jsonl source: test file
    d.strict = True  # bad records: True = fail with file:line:field, False = skip and count
    d.allow_empty_validation = False  # SFT only: True = an empty val split trains without validation, no best/
    d.max_length_tokens = 128  # fixed sequence length of SFT batches
    d.drop_long = True  # True = drop sequences over max_length_tokens (the paper), False = truncate the user text
    d.include_therapist_emotion = True  # False = the paper's "SFT (no emotion)" ablation
    d.include_strategy = False  # tag each therapist turn with its strategy
    d.context_turns = 0  # previous turns given as context (0 = the paper's format)
    d.user_emotion_from = "last"  # first | last client utterance of the run
    d.therapist_run = "first"  # first utterance of a therapist run (the paper) | merge the run
    d.problem_type = "unknown"  # problem-type policy for MESC (see data/SCHEMA.md)
    d.max_train_samples = 0  # 0 = all; else the first N training samples (smoke runs)
    d.max_eval_samples = 0  # 0 = all; else the first N samples of each of the val AND test splits
    d.max_prompt_tokens = 96  # fixed prompt length for generation (left-padded)
    d.esconv_emotion_map = ml_collections.ConfigDict()  # ESConv emotion -> MESC label; empty = the documented default
    d.esconv_supporter_emotion = "neutral"  # ESConv has no supporter emotion: this label is used for every reply
    return d


def model_defaults() -> ml_collections.ConfigDict:
    m = ml_collections.ConfigDict()
    m.hf_checkpoint = ""  # local HF GPT-2 directory (config.json + model.safetensors); "" = train from scratch
    m.n_layer = 12  # transformer blocks (GPT-2 small; an HF checkpoint's shape wins over n_*)
    m.n_head = 12  # attention heads per block (must divide n_embd)
    m.n_embd = 768  # hidden width
    m.n_positions = 1024  # longest sequence (prompt + reply) the position table covers
    m.dropout_rate = 0.1  # embedding, residual and attention dropout in training
    m.dtype = "float32"  # compute dtype: float32 | bfloat16
    m.remat = False  # rematerialise blocks to save memory
    m.family = ""  # gpt2 | mistral | llama | qwen2 | mixtral; "" = the hf_checkpoint's model_type, else gpt2
    m.decoder = decoder_defaults()  # shape of a fresh mistral/llama/qwen2/mixtral (an HF checkpoint's wins)
    m.router_aux_loss_coef = -1.0  # MoE load-balancing loss weight; < 0 = the checkpoint's (fresh: 0.02)
    m.lora = lora_defaults()  # LoRA adapters (rank 0 = off)
    return m


def decoder_defaults() -> ml_collections.ConfigDict:
    d = ml_collections.ConfigDict()
    d.n_kv_head = 0  # key/value heads (grouped-query attention); 0 = n_head
    d.intermediate_size = 0  # SwiGLU width; 0 = 4 * n_embd
    d.sliding_window = 0  # attention window in tokens (mistral); 0 = full causal attention
    d.rope_theta = 10000.0  # RoPE base
    d.num_experts = 8  # experts per MoE layer (mixtral only)
    d.experts_per_token = 2  # top-k routing (mixtral only)
    d.tie_word_embeddings = False  # LM head shares the token embedding
    return d


def lora_defaults() -> ml_collections.ConfigDict:
    lo = ml_collections.ConfigDict()
    lo.rank = 0  # LoRA rank; 0 = full fine-tuning (mistral-type families only)
    lo.alpha = 16.0  # adapter scale = alpha / rank
    lo.dropout_rate = 0.0  # dropout on the adapter's input in training
    lo.target_regex = r"self_attn/(q_proj|k_proj|v_proj|o_proj)$"  # layers adapted, searched in the param path
    lo.train_embeddings = True  # SFT also trains the token embedding and LM head (the run's new marker tokens)
    return lo


def tokenizer_defaults() -> ml_collections.ConfigDict:
    t = ml_collections.ConfigDict()
    t.path = ""  # local HF tokenizer dir; "" = the hf_checkpoint's, or train a BPE on the training text
    t.bpe_vocab_size = 8000  # vocabulary of the BPE trained from scratch
    return t


def mesh_defaults() -> ml_collections.ConfigDict:
    mesh = ml_collections.ConfigDict()
    mesh.data = -1  # -1 = all remaining devices
    mesh.fsdp = 1  # devices the parameters and optimizer state are sharded over (FSDP)
    mesh.tensor = 1  # devices each layer's matrices are split over (tensor parallel)
    mesh.expert = 1  # devices the experts of each MoE layer are split over (the batch is split over them too)
    return mesh


def sampling_defaults() -> ml_collections.ConfigDict:
    s = ml_collections.ConfigDict()
    s.max_new_tokens = 64  # longest reply, in tokens
    s.temperature = 1.0  # logits divided by it before sampling
    s.top_k = 0  # 0 = off
    s.top_p = 1.0  # 1.0 = off
    s.greedy = False  # True = argmax (temperature, top_k and top_p ignored)
    return s


def wandb_defaults() -> ml_collections.ConfigDict:
    w = ml_collections.ConfigDict()
    w.enabled = False  # True = also log to Weights & Biases (pip install -e ".[viz]")
    w.mode = "offline"  # offline (files under <workdir>/wandb, sync later) | online | disabled
    w.project = "therapy_rl"  # W&B project
    w.name = ""  # W&B run name; "" = W&B picks one
    return w


def sft_defaults() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.mode = "sft"  # the stage: sft | ppo | eval
    c.seed = 42  # PRNG root: data order, initialisation, dropout, sampling
    c.data = data_defaults()
    c.model = model_defaults()
    c.tokenizer = tokenizer_defaults()
    c.mesh = mesh_defaults()

    c.global_batch_size = 32  # sequences per optimizer step, over all hosts
    c.grad_accum_steps = 1  # micro-batches per step (global_batch_size must divide evenly)
    c.num_epochs = 20.0  # passes over the training samples (fractions allowed)
    c.max_steps = 0  # 0 = num_epochs worth of steps
    c.learning_rate = 2e-5  # peak AdamW learning rate
    c.warmup_fraction = 0.1  # of all steps, linear warm-up from 0
    c.lr_schedule = "linear"  # linear | cosine | constant
    c.weight_decay = 0.0  # AdamW decoupled weight decay
    c.grad_clip_norm = 1.0  # global gradient-norm clip; <= 0 = off

    c.log_every_steps = 10  # train metrics to metrics.jsonl / TensorBoard
    c.eval_every_steps = 200  # validation loss; also decides the best checkpoint
    c.checkpoint_every_steps = 200  # a resumable checkpoint in checkpoints/
    c.keep_checkpoints = 2  # last-N checkpoints kept for resuming (the best one is kept separately)
    c.early_stopping_patience_evals = 0  # 0 = off; else stop after this many evals without improvement
    c.eval_batch_size = 64  # sequences per validation-loss batch, over all hosts
    c.progress_bar = True  # tqdm bar over steps

    c.num_sample_replies = 4  # replies printed for validation prompts at the end
    c.sampling = sampling_defaults()  # decoding of the sample replies
    c.wandb = wandb_defaults()  # optional Weights & Biases logging (TensorBoard and metrics.jsonl are always on)
    c.export_hf = False  # at the end, export the best checkpoint (else the last) to hf_export/, as therapy_rl.export
    return c


def human_reward_defaults() -> ml_collections.ConfigDict:
    """reward.kind = human: clinicians rate each rollout in the rating app (``python -m therapy_rl.rate``)."""
    h = ml_collections.ConfigDict()
    h.store_dir = ""  # folder of ratings.sqlite; "" = the PPO workdir (serve it: python -m therapy_rl.rate serve)
    h.run_name = ""  # this run's name in the store; "" = the workdir's folder name
    h.min_ratings = 1  # k: ratings each reply waits for
    h.timeout_s = 3600.0  # per batch (from queueing or re-attaching); then unrated replies are skipped; <= 0 = none
    h.poll_s = 2.0  # seconds between looks at the store while waiting
    h.aggregate = "mean"  # mean | zscore (each rater's scores standardised, then averaged)
    h.human_weight = 1.0  # weight of the aggregated 0-1 rating in the reward
    h.auto_kind = ""  # automatic reward mixed in, and the validation reward: "" | therapy | emotion_tag | learned_human
    h.auto_weight = 0.0  # its weight in the training reward (validation prompts use it alone)
    h.unsafe_penalty = 2.0  # subtracted when any rater flags a reply unsafe (kept out of the score clip)
    return h


def learned_human_reward_defaults() -> ml_collections.ConfigDict:
    """reward.kind = learned_human: the head ``python -m therapy_rl.rate train-rm`` fits to the ratings."""
    l = ml_collections.ConfigDict()  # noqa: E741
    l.model_path = ""  # its reward_model.npz; required for this kind
    l.scale = 1.0  # total = scale x predicted rating (0-1)
    return l


def ppo_defaults() -> ml_collections.ConfigDict:
    """PPO from an SFT run, in the paper's settings (TRL 0.11 PPOTrainer): batch and mini-batch 16, 4 PPO epochs,
    lr 1e-6, clip 0.2, value-loss weight 0.1, adaptive KL 0.2 (target 6, horizon 10000), gamma 1, lambda 0.95,
    sampled generation of at most 128 new tokens."""
    c = ml_collections.ConfigDict()
    c.mode = "ppo"  # the stage: sft | ppo | eval
    c.seed = 42  # PRNG root: prompt order, value-head init, rollouts, dropout
    c.init_from = ""  # the SFT workdir (or one of its best/ / checkpoints/ folders); required
    c.init_checkpoint = "best"  # best | last: which of the SFT run's checkpoints starts the policy and reference
    c.init_step = -1  # step in that folder; -1 = its latest
    c.data = unset(data_defaults())  # None (not set) = the SFT run's value (its run_info.json)
    c.mesh = mesh_defaults()

    c.global_batch_size = 16  # prompts per PPO iteration (rollout batch), over all hosts
    c.num_epochs = 4.0  # passes over the training prompts
    c.max_iterations = 0  # 0 = num_epochs worth of iterations
    c.learning_rate = 1e-6  # peak AdamW learning rate
    c.warmup_fraction = 0.0  # of all optimizer updates (iterations x PPO epochs x mini-batches)
    c.lr_schedule = "constant"  # linear | cosine | constant, after the warm-up
    c.weight_decay = 0.0  # AdamW decoupled weight decay
    c.adam_b1 = 0.9  # Adam first-moment decay
    c.adam_b2 = 0.999  # Adam second-moment decay
    c.adam_eps = 1e-8  # Adam denominator epsilon
    c.grad_clip_norm = 0.0  # <= 0 = off (TRL 0.11 has none)

    p = ml_collections.ConfigDict()
    p.minibatch_size = 16  # rows per optimizer update; must divide global_batch_size
    p.num_ppo_epochs = 4  # passes over each rollout batch
    p.grad_accum_steps = 1  # micro-batches per mini-batch (must divide minibatch_size)
    p.clip_eps = 0.2  # policy ratio clip
    p.value_clip_eps = 0.2  # value clip around the rollout values; <= 0 = off
    p.vf_coef = 0.1  # value-loss weight
    p.entropy_coef = 0.0  # entropy bonus weight (TRL 0.11 has none)
    p.loss_aggregation = "token_mean"  # token_mean | sequence_mean
    p.adaptive_kl = True  # False = fixed coefficient
    p.init_kl_coef = 0.2  # starting KL penalty coefficient (beta)
    p.kl_target = 6.0  # nats per response (adaptive controller)
    p.kl_horizon = 10000.0  # samples (adaptive controller)
    p.kl_estimator = "k1"  # k1 | k2 | k3 | abs: per-token KL in the penalty
    p.gamma = 1.0  # discount
    p.lam = 0.95  # GAE lambda
    p.score_clip = 10.0  # raw reward clipped to [-c, c] (safety penalty exempt) before whitening; <= 0 = off
    p.whiten_scores = True  # z-score the B sequence scores over the batch (the project's; the paper's code: False)
    p.whiten_advantages = True  # whiten advantages over the batch's tokens (TRL)
    p.whiten_token_rewards = False  # whiten per-token rewards, mean kept (TRL whiten_rewards; the paper's code: True)
    p.missing_eos_penalty = 0.0  # subtracted from the score of responses that never emit EOS; 0 = off
    p.ratio_threshold = 10.0  # skip a mini-batch whose mean ratio exceeds this (TRL 0.11); <= 0 = off
    p.separate_critic = False  # True = a second GPT-2 trunk (from the same SFT params) under the value head
    p.dropout = False  # dropout in the update's forward passes (off: the first ratio is 1 up to float rounding)
    p.reuse_rollout_logprobs = True  # old log-probs (shared trunk: and values) from the sampler, no forward pass; needs sampling.temperature == 1
    p.value_dropout_rate = 0.1  # value-head dropout, only with dropout = True
    p.value_head_init = "torch_linear"  # torch_linear | scaled_normal | zeros
    c.ppo = p

    r = ml_collections.ConfigDict()
    r.kind = "therapy"  # therapy (rewards/combine.py) | emotion_tag | target_token | human | learned_human
    t = ml_collections.ConfigDict()  # rewards.combine.RewardConfig fields (unset ones keep its defaults)
    t.quality_weight = 1.1  # weight of quality (repetition, over-used words, length; rewards/components.py)
    t.emotion_weight = 1.2  # weight of the emotion tag's validity and match with the annotated emotion
    t.relevance_weight = 1.1  # weight of the reply's relevance to the user's message
    t.sentiment_weight = 0.7  # weight of the reply's sentiment
    t.empathy_weight = 0.7  # weight of the reply's empathy
    t.penalty_weight = 1.0  # weight of the penalty for a joy tag after a negative user emotion
    t.use_quality = True  # False = leave the quality component out
    t.use_emotion = True  # False = leave the emotion component out
    t.use_relevance = True  # False = leave the relevance component out
    t.use_sentiment = True  # False = leave the sentiment component out
    t.use_empathy = True  # False = leave the empathy component out
    t.use_penalty = True  # False = leave the joy-after-negative penalty out
    t.use_safety = True  # False = no safety penalty (crisis without resources, encouraged harm)
    t.use_guard = False  # True = the learned guard (guard.py) also flags replies and user crises in the reward; off: it
    # flags 27 of 445 real MESC val therapist replies read alone (as the reward reads them), each a -10 penalty
    t.safety_after_clip = True  # True = the safety penalty is added after the score clip (it is never clipped)
    t.whiten = False  # the PPO step clips and whitens (ppo.score_clip, ppo.whiten_scores)
    t.relevance_text = "raw"  # raw (project: texts as they are) | paper_clean (paper's code: lower case, no punct.)
    q = ml_collections.ConfigDict()  # rewards.components.QualityConfig fields (unset ones keep its defaults)
    q.formula = "tokens"  # tokens (project's rules on policy ids) | paper_code (paper's code on the reply text)
    q.length_rule = "range"  # tokens formula: range (project) | paper (-10 at 100+ chars or yes/no/ok/thanks) | none
    t.quality = q
    es = ml_collections.ConfigDict()  # rewards.components.EmotionScores fields (unset ones keep its defaults)
    es.conflict_absolute = False  # joy vs negative label: False = 1 - 5 = -4 (project); True = -5 (paper's code)
    t.emotion_scores = es
    r.therapy = t
    e = ml_collections.ConfigDict()  # emotion_tag: a simple reward read from the response's token ids
    e.present_weight = 1.0  # a valid emotion label after <therapist_emotion>
    e.correct_weight = 2.0  # the label equals the annotated therapist emotion
    e.length_weight = 1.0  # times -min(1, |length - target_length| / target_length)
    e.target_length = 32  # response tokens
    r.emotion_tag = e
    k = ml_collections.ConfigDict()  # target_token: the toy task, share of one token in the response
    k.token = "the"  # a token string of the policy tokenizer
    k.token_id = -1  # >= 0 overrides `token`
    k.scale = 1.0  # reward = scale x the token's share of the response
    r.target_token = k
    r.human = human_reward_defaults()  # reward.kind = human (therapy_rl/rate)
    r.learned_human = learned_human_reward_defaults()  # reward.kind = learned_human (therapy_rl/rate)
    c.reward = r

    c.sampling = sampling_defaults()  # rollout decoding
    c.sampling.max_new_tokens = 128  # the paper; temperature 1, no top-k/top-p: PPO needs the raw policy

    c.log_every_iterations = 1  # iteration metrics to metrics.jsonl / TensorBoard
    c.eval_every_iterations = 50  # validation reward; also decides the best checkpoint
    c.checkpoint_every_iterations = 50  # a resumable checkpoint in checkpoints/
    c.keep_checkpoints = 2  # last-N checkpoints kept for resuming (the best one is kept separately)
    c.early_stopping_patience_evals = 0  # 0 = off; else stop after this many evals without a better eval/scores
    c.eval_at_start = True  # validate the SFT policy first (the baseline the best checkpoint must beat)
    c.num_eval_prompts = 256  # first N validation prompts (fixed); 0 = all
    c.eval_batch_size = 64  # prompts per validation generation batch, over all hosts
    c.progress_bar = True  # tqdm bar over iterations
    c.num_sample_replies = 4  # replies printed for validation prompts at the end
    c.wandb = wandb_defaults()  # optional Weights & Biases logging (TensorBoard and metrics.jsonl are always on)
    return c


def eval_defaults() -> ml_collections.ConfigDict:
    """Evaluation of an SFT or PPO run (``therapy_rl.evaluation.runner``): generate for a split, score, report."""
    c = ml_collections.ConfigDict()
    c.mode = "eval"  # the stage: sft | ppo | eval
    c.seed = 42  # PRNG root of the decoding search and of the evaluation's sampling
    c.name = ""  # this model's label in the report; "" = the checkpoint run's folder name
    c.checkpoint = ""  # a run workdir (SFT or PPO) or one of its checkpoint folders (best/, checkpoints/); required
    c.checkpoint_which = "best"  # best | last: which folder of a run workdir
    c.checkpoint_step = -1  # step in that folder; -1 = its latest
    c.split = "test"  # val | test: the split scored
    c.data = unset(data_defaults())  # None (not set) = the run's value (its run_info.json); e.g. source=esconv
    c.eval_batch_size = 64  # prompts per generation batch (fixed shape: the last batch is padded), over all hosts
    c.mesh = mesh_defaults()  # params sharded as in training, prompt batches on data x fsdp
    c.sampling = sampling_defaults()
    c.sampling.max_new_tokens = 128  # the paper; top_p/top_k/temperature are replaced by a saved decoding.json
    c.use_saved_decoding = True  # use decoding.json of the eval workdir, else of the checkpoint's run workdir

    d = ml_collections.ConfigDict()  # grid search of top_p x top_k x temperature, saved to <workdir>/decoding.json
    d.enabled = False  # search before evaluating (reuses an existing decoding.json unless redo=True)
    d.redo = False  # search again even when the eval workdir has a decoding.json
    d.split = "val"  # the split searched; a test split is refused unless allow_test_split
    d.allow_test_split = False  # True = tune on test like the paper (reports then carry a warning)
    d.limit = 100  # first N prompts of the search split (0 = all)
    d.metric = "rougeL"  # score maximised: any key of the scores (bleu, rouge1, meteor, emotion_accuracy, ...)
    d.metric_weights = ml_collections.ConfigDict()  # non-empty = maximise this weighted sum of scores instead
    d.top_p = (0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95, 1.0)  # the paper's grid: 0.6-1.0 ...
    d.top_k = (0, 5, 10, 15, 20, 25, 30, 35)  # ... x 0-35 (0 = no top-k) ...
    d.temperature = (1.0, 1.1, 1.2, 1.3)  # ... x 1.0-1.3 (288 settings; traced: 4 compiled samplers in all)
    c.decoding_search = d

    m = ml_collections.ConfigDict()
    m.bertscore = True  # BERTScore-style P/R/F1 from MiniLM token states (slow on CPU: ~0.3 s per sample)
    m.bertscore_batch_size = 64  # replies per MiniLM forward pass
    m.meteor_variant = "auto"  # auto | nltk-full | exact+stem (auto: full when NLTK finds WordNet)
    m.bootstrap_resamples = 1000  # for the 95% confidence intervals
    m.confidence = 0.95  # level of the bootstrap confidence intervals
    c.metrics = m

    e = ml_collections.ConfigDict()  # emotion of replies from a classifier, for models that emit no tag
    e.source = "auto"  # auto (classifier iff the run was trained without emotion tags) | tag | classifier
    e.heads_dir = ""  # folder of the reward heads' heads.npz; "" = the weights shipped with therapy_rl.rewards
    c.emotion = e

    j = ml_collections.ConfigDict()  # LLM-as-judge over an OpenAI-compatible chat endpoint
    j.enabled = False  # True = score replies with the judge (needs base_url, model and the key)
    j.base_url = ""  # e.g. https://api.openai.com/v1 or http://127.0.0.1:8000/v1
    j.model = ""  # e.g. gpt-4o-mini (the paper's)
    j.api_key_env = "OPENAI_API_KEY"  # name of the environment variable with the key; "" = no auth header
    j.mode = "per_criterion"  # per_criterion (the paper: one call per criterion) | all_criteria
    j.limit = 100  # first N evaluated samples judged (the paper: 100); 0 = all
    j.temperature = 0.1  # the judge's sampling temperature
    j.timeout_s = 60.0  # per request
    j.max_retries = 4  # retries after a request's first failed attempt (with back-off)
    j.cache_path = ""  # JSONL cache of judgments; "" = <workdir>/judge_cache.jsonl
    c.judge = j

    r = ml_collections.ConfigDict()
    r.paper_table = "auto"  # auto (mesc -> Table 5, esconv -> Table 6, else none) | mesc | esconv | none
    r.n_sample_rows = 10  # sample generations shown in report.md
    c.report = r
    return c


PRETRAIN_SOURCES = ("mesc_train", "esconv", "empatheticdialogues", "counsel_chat", "annomi", "depression_severity",
                    "reddit_cssrs", "sdcnl", "epitome")


def repro_defaults() -> ml_collections.ConfigDict:
    """``python -m therapy_rl.repro``: pre-training, SFT with and without emotion, PPO in three configurations,
    decoding chosen on MESC validation, evaluation on MESC test and ESConv test, RESULTS.md (issue 14)."""
    c = ml_collections.ConfigDict()
    c.mode = "repro"  # the stage: sft | ppo | eval | repro (this driver: python -m therapy_rl.repro)
    c.seed = 42  # PRNG root of every stage
    c.data_root = ""  # folder of the datasets (mesc/, esconv/, ...); "" = $THERAPY_RL_DATA

    p = ml_collections.ConfigDict()  # stage 1: causal-LM pre-training of a small GPT-2 (therapy_rl/pretrain.py)
    p.sources = PRETRAIN_SOURCES  # corpora (MESC train only; ESConv train + valid; therapy_rl/pretrain.py)
    p.max_docs_per_source = 0  # 0 = all; else the first N documents of each source (smoke runs)
    p.val_fraction = 0.02  # share of documents held out for the validation perplexity
    p.max_val_blocks = 256  # validation blocks scored; 0 = all
    p.bpe_vocab_size = 8000  # byte-level BPE trained on the corpus (markers included)
    p.block_tokens = 128  # tokens per training sequence
    p.n_layer = 4  # transformer blocks
    p.n_head = 4  # attention heads
    p.n_embd = 256  # hidden width
    p.n_positions = 256  # position table: prompt (96) + reply (128) must fit
    p.dropout_rate = 0.0  # dropout in pre-training (later stages use the model section's default)
    p.batch_size = 32  # sequences per step
    p.max_steps = 1200  # optimizer steps (about 27 min on 2 CPU cores, measured; 4.9M tokens)
    p.learning_rate = 1e-3  # peak AdamW learning rate (cosine decay)
    p.warmup_fraction = 0.05  # of max_steps, linear warm-up
    p.weight_decay = 0.01  # AdamW decoupled weight decay
    p.log_every_steps = 20  # train metrics to metrics.jsonl
    p.eval_every_steps = 200  # validation loss and a resumable checkpoint
    c.pretrain = p

    s = ml_collections.ConfigDict()  # stage 2: SFT on MESC train (configs/sft_mesc.py), with and without emotion
    s.num_epochs = 10.0  # passes over MESC train
    s.max_steps = 0  # 0 = num_epochs worth of steps
    s.learning_rate = 2e-4  # peak AdamW learning rate
    s.global_batch_size = 32  # sequences per step
    s.eval_every_steps = 100  # validation loss (best/ = lowest) and checkpoint
    s.early_stopping_patience_evals = 3  # stop after this many evals without a better validation loss
    s.max_train_samples = 0  # 0 = all; else the first N (smoke runs)
    s.max_eval_samples = 0  # 0 = all; else the first N of val and test (smoke runs; also PPO and eval)
    c.sft = s

    pp = ml_collections.ConfigDict()  # stage 3: PPO from the with-emotion SFT, one run per configuration
    pp.configs = ("ppo_paper_as_described", "ppo_paper_as_run", "ppo_ours")  # config files under configs/
    pp.num_epochs = 1.0  # passes over the training prompts
    pp.max_iterations = 0  # 0 = num_epochs worth of iterations
    pp.global_batch_size = 16  # prompts per iteration
    pp.minibatch_size = 16  # rows per optimizer update
    pp.max_new_tokens = 64  # longest rollout reply
    pp.eval_every_iterations = 25  # validation reward (best/ = highest) and checkpoint
    pp.num_eval_prompts = 64  # first N validation prompts scored
    c.ppo = pp

    e = ml_collections.ConfigDict()  # stage 4: decoding search on MESC val, then MESC test and ESConv test
    e.search_limit = 100  # first N MESC validation prompts of the decoding search
    e.search_metric = "rougeL"  # score the search maximises
    e.top_p = (0.7, 0.9, 1.0)  # decoding grid: top_p ...
    e.top_k = (0, 10)  # ... x top_k ...
    e.temperature = (1.0, 1.2)  # ... x temperature
    e.max_new_tokens = 64  # longest reply
    e.eval_batch_size = 64  # prompts per generation batch
    e.bertscore = False  # BERTScore-MiniLM (slow on CPU)
    e.bootstrap_resamples = 1000  # for the 95% intervals and the paired bootstrap
    e.esconv = True  # also evaluate on ESConv test (cross-domain)
    e.max_esconv_samples = 0  # 0 = all ESConv test samples; else the first N
    c.eval = e
    return c


def config_file(name: str) -> ml_collections.ConfigDict:
    """``configs/<name>.py``'s get_config() from this checkout (configs that build on another one)."""
    import importlib.util
    import os

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", f"{name}.py")
    spec = importlib.util.spec_from_file_location(f"configs_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()
