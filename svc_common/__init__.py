"""Pieces every service shares: logging set-up, error mapping, gRPC server plumbing, model location."""
