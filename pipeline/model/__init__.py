"""The VLM and everything a model folder's remote code needs. Flat, with single-dot imports only:
transformers copies modeling_tokenflex.py and the files it imports relatively into every model
folder (folder.py: write_model_folder), so these modules travel together.

    vlm.py          TokenFlexVLM: its parts, splicing image embeddings into the text, the forward and its loss
    batch.py        Batch: what a forward takes
    loss.py         which tokens are supervised and how much each weighs
    construction.py building a model from its parts' checkpoints, a recorded structure or a model folder; saving it
    folder.py       a model folder: its config.json (VLMConfig), writing and reading it
    inputs.py       what inference feeds the model: prompts, images, batches
    inference.py    generation with its prefill timed, answer probabilities, reply log-likelihoods
    runtime.py      dtypes by name, the device inference picks, copies to the device, timing
    attention.py    attention implementations, and flash-attention's packed-sequence arguments
    chat.py         the LM's chat formats, tokenizing conversations, image markers
    images.py       an image -> the tower's uint8 pixels; normalizing them on the model's device
    tiles.py        high-resolution images as tiles, and where tiles sit in the text
    vision.py       the vision tower and its patch features
    projector.py    the token-adaptive projector (pooling to n x n, norm, SwiGLU), by name
    modeling_tokenflex.py  the remote-code entry point: plain transformers loads a folder through it
"""
