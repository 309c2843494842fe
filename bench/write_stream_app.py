"""The common pattern this app replaces: st.write_stream straight from the model, inside the script run.

Used by bench/asker_latency.py as the baseline. One session, no persistence.
"""

import openai
import streamlit as st

client = openai.OpenAI(api_key="not-needed")
history = st.session_state.setdefault("history", [])
for message in history:
    with st.chat_message(message["role"]):
        st.markdown(message["content"])

if prompt := st.chat_input("Message"):
    history.append({"role": "user", "content": prompt})
    with st.chat_message("user"):
        st.markdown(prompt)
    with st.chat_message("assistant"):
        stream = client.chat.completions.create(model="bench", messages=history, stream=True)
        reply = st.write_stream(stream)
    history.append({"role": "assistant", "content": reply})
