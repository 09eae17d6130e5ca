"""`python applications/chat.py --path DIR`: multi-turn chat with a trained actor (see inference/chatbot.py, the
same program under DeepSpeed-Chat's entry-point name)."""
from inference.chatbot import ChatConfig, main

__all__ = ["ChatConfig", "main"]

if __name__ == "__main__":
    main()
