"""Entry points over the methods: train, resume, evaluate, compare, collect, and their outputs."""
