"""Label vocabularies shared by data, rewards and evaluation (no heavy imports)."""

# MESC's seven emotion labels, used on both speakers. The order fixes the class index.
EMOTIONS = ("anger", "sadness", "depression", "disgust", "fear", "joy", "neutral")
EMOTION_TO_INDEX = {name: i for i, name in enumerate(EMOTIONS)}

# Valence groups of the paper's emotion-alignment reward.
NEGATIVE_EMOTIONS = ("anger", "sadness", "depression", "disgust", "fear")
POSITIVE_EMOTIONS = ("joy",)
NEUTRAL_EMOTIONS = ("neutral",)
EMOTION_GROUP = {
    **{e: "negative" for e in NEGATIVE_EMOTIONS},
    **{e: "positive" for e in POSITIVE_EMOTIONS},
    **{e: "neutral" for e in NEUTRAL_EMOTIONS},
}

# MESC therapist strategies (client rows carry "undefined"). Lower-case variants are normalised.
MESC_STRATEGIES = (
    "Interpretation",
    "Open question",
    "Self-disclosure",
    "Restatement",
    "Approval",
    "Communication Skills",
    "Advisement",
    "Guiding the Pace and Depth of the Conversation",
    "Structuring the therapy",
    "Others",
)

# Structural markers of the emotion-conditioned sequence format, in a fixed order.
BOS, EOS, PAD = "<bos>", "<eos>", "<pad>"
PROBLEM, USER, USER_EMOTION = "<problem>", "<user>", "<user_emotion>"
THERAPIST, THERAPIST_EMOTION = "<therapist>", "<therapist_emotion>"
STRATEGY, CONTEXT = "<strategy>", "<context>"
MARKER_TOKENS = (BOS, EOS, PAD, PROBLEM, USER, USER_EMOTION, THERAPIST, THERAPIST_EMOTION, STRATEGY, CONTEXT)

# ESConv supporter strategies (its strategy.json, without brackets); seeker rows carry none.
ESCONV_STRATEGIES = (
    "Question",
    "Restatement or Paraphrasing",
    "Reflection of feelings",
    "Self-disclosure",
    "Affirmation and Reassurance",
    "Providing Suggestions",
    "Information",
    "Others",
)
