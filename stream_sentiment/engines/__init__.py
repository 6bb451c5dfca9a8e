"""Engines: one interface (activate / warm up / infer a bucketed batch / rebuild), several backends."""
