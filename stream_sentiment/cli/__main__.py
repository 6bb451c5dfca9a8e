"""``python -m stream_sentiment.cli``: the ``stream-sentiment`` command through this interpreter."""

from stream_sentiment.cli import main

raise SystemExit(main())
