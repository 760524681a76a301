"""The rating rubric: the criteria the Barrow report's psychologist scored each reply on (0-1 overall)."""

# (key stored with a rating, label shown to the rater)
RUBRIC = (
    ("empathy", "Acknowledges the person's feelings with empathy"),
    ("boundaries", "Keeps appropriate therapeutic boundaries"),
    ("no_harm", "Avoids harmful or dismissive language"),
    ("guidance", "Offers constructive guidance without medical advice"),
)
RUBRIC_KEYS = tuple(key for key, _ in RUBRIC)
MAX_COMMENT_CHARS = 4000
