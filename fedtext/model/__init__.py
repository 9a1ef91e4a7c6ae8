"""The model: the char-RNN (char_rnn.py), its recurrences and C kernel, checkpoints, Keras
import and export, and text generation."""
