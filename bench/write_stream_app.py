"""The common pattern this app replaces: st.write_stream straight from the model, inside the script run.

Used by bench/asker_latency.py as the baseline. One session, no persistence;
BENCH_HISTORY=n starts each session with n messages, like a room's history.
"""

import os

import openai
import streamlit as st

client = openai.OpenAI(api_key="not-needed")
if "history" not in st.session_state:
    st.session_state.history = [
        {"role": "user", "content": f"Message {i}: a few words about nothing in particular, to fill the room."}
        if i % 2 == 0 else {"role": "assistant", "content": f"Reply {i}. " + "Some sentence of an answer. " * 6}
        for i in range(int(os.environ.get("BENCH_HISTORY", "0")))
    ]
history = st.session_state.history
for message in history:
    with st.chat_message(message["role"]):
        st.markdown(message["content"])

if prompt := st.chat_input("Message"):
    history.append({"role": "user", "content": prompt})
    with st.chat_message("user"):
        st.markdown(prompt)
    with st.chat_message("assistant"):
        stream = client.chat.completions.create(model="bench", messages=history[-20:], stream=True)
        reply = st.write_stream(stream)
    history.append({"role": "assistant", "content": reply})
