"""Cross-domain evaluation of a MESC-trained run on the ESConv test split (the paper's Table 6).

    python -m therapy_rl.main --config configs/eval_esconv.py --workdir /tmp/eval_esconv --config.checkpoint=RUN

ESConv labels one emotion per dialogue (the seeker's); it is mapped to the 7 MESC labels by
``config.data.esconv_emotion_map``, written out below (the data room's default,
``sources.DEFAULT_ESCONV_EMOTION_MAP``) so that each entry can be changed on the command line, e.g.
``--config.data.esconv_emotion_map.shame=disgust``. Supporter turns have no emotion: every reference therapist
emotion is ``config.data.esconv_supporter_emotion``, so emotion accuracy here measures only how often the model
emits that label (its majority baseline is 1.0). Prompts use the run's format (the run's data options).
"""

import ml_collections

from therapy_rl import defaults


def get_config():
    config = defaults.eval_defaults()
    config.data.source = "esconv"
    config.data.esconv_emotion_map = ml_collections.ConfigDict({
        "anxiety": "fear", "nervousness": "fear", "fear": "fear", "depression": "depression", "sadness": "sadness",
        "pain": "sadness", "shame": "sadness", "guilt": "sadness", "anger": "anger", "jealousy": "anger",
        "disgust": "disgust"})
    config.data.esconv_supporter_emotion = "neutral"
    config.split = "test"
    config.metrics.bertscore = True
    config.sampling.max_new_tokens = 128
    config.report.paper_table = "esconv"
    return config
