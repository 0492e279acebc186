nps-ask = How likely are you to recommend Example Shop to a friend? 0 = not at all, 10 = definitely.
nps-promoter = Thank you, that means a lot! Would you leave a short review, or share the shop with a friend?
nps-btn-review = Write a review
nps-btn-refer = Invite a friend
nps-refer = Send this link to a friend — you both get an extra spin in our prize wheel: https://t.me/ExampleShopBot?start={ $referral_ref }
nps-passive = Thanks! What one thing should we improve?
nps-thanks = Thank you, we read every answer.
nps-detractor = We are sorry to hear that. What went wrong?
nps-p-delivery = Delivery
nps-p-product = The product
nps-p-support = Customer service
nps-p-other = Something else
nps-detail = Please tell us what happened, in a few words.
nps-0 = 0
nps-1 = 1
nps-2 = 2
nps-3 = 3
nps-4 = 4
nps-5 = 5
nps-6 = 6
nps-7 = 7
nps-8 = 8
nps-9 = 9
nps-10 = 10
