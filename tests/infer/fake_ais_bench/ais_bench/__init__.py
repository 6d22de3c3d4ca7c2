"""TEST DOUBLE of Ascend's ais_bench package (see infer/interface.py); never installed."""
