"""Teachers write reasoning traces for puzzles: an OpenAI-compatible endpoint, or the
built-in marker-gene teacher."""
